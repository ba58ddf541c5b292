"""Raw corpora → blocks of records → validated field values, with every bad record named by location.

Inputs are JSON Lines (`.jsonl`/`.json`, optionally `.gz`/`.zst`) and Parquet, given as files, globs or
directories (searched recursively), expanded in sorted order so the output never depends on listing
order. Files are cut into blocks of whole lines (or Parquet row batches) — the unit of work sent to
worker processes — and each block is parsed into records by `parse_block`.

A record is skipped, never silently, when it is: `invalid_json` (or not an object), `invalid_utf8`
(bad bytes, or a lone surrogate escape that cannot be encoded), `missing_key` (absent or null),
`non_string`, or `empty_text`. A record is kept or skipped as a whole, so the datasets written for
several `--json-keys` stay aligned record by record.
"""
from __future__ import annotations

import glob
import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSIONS = {".gz": "gz", ".zst": "zst", ".zstd": "zst"}
REASONS = ("invalid_json", "invalid_utf8", "missing_key", "non_string", "empty_text")


class InputError(ValueError):
    """An input that cannot be read at all (missing, unsupported, corrupt, lacking a column)."""


@dataclass(frozen=True)
class InputFile:
    path: str
    format: str  # "jsonl" | "parquet"
    compression: str | None  # None | "gz" | "zst"
    size: int  # bytes on disk


@dataclass
class Block:
    """Consecutive records of one file: whole JSONL lines, or Parquet columns of a row batch."""

    file_index: int
    first_line: int  # 1-based line (JSONL) or row (Parquet) of the first record
    data: bytes | None = None
    columns: dict[str, Any] | None = None  # Parquet: name -> pyarrow Array
    raw_bytes: int = 0  # bytes of the file on disk this block accounts for (progress)


@dataclass
class BadRecord:
    reason: str  # one of REASONS
    location: str  # "file:line" or "file:row N"
    detail: str


@dataclass
class ParsedBlock:
    lines: list[int] = field(default_factory=list)  # line/row of each good record
    texts: list[list[str]] = field(default_factory=list)  # per key: the texts of good records
    extras: list[list[str]] = field(default_factory=list)  # per extra field (group/sort keys)
    bad: list[BadRecord] = field(default_factory=list)
    records: int = 0
    blank_lines: int = 0
    text_bytes: int = 0  # uncompressed bytes read


def classify(path: str) -> tuple[str, str | None] | None:
    """(format, compression) from the file name, or None when it is not a supported input."""
    name = Path(path).name.lower()
    compression = None
    for suffix, comp in COMPRESSIONS.items():
        if name.endswith(suffix):
            compression, name = comp, name[: -len(suffix)]
            break
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl", compression
    if name.endswith(".parquet") and compression is None:
        return "parquet", None
    return None


def expand_inputs(inputs: Sequence[str]) -> list[InputFile]:
    """Files, globs and directories → the sorted, de-duplicated list of supported input files."""
    paths: list[str] = []
    for item in inputs:
        if any(c in item for c in "*?["):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise InputError(f"--input {item!r} matches no file")
        elif Path(item).exists():
            matches = [item]
        else:
            raise InputError(f"--input {item!r} does not exist")
        for m in matches:
            if Path(m).is_dir():
                found = sorted(str(p) for p in Path(m).rglob("*") if p.is_file() and classify(str(p)))
                if not found and not any(c in item for c in "*?["):
                    raise InputError(f"--input directory {m!r} holds no .jsonl/.json(.gz/.zst) or .parquet file")
                paths.extend(found)
            elif classify(m) is None:
                if not any(c in item for c in "*?["):
                    raise InputError(f"--input {m!r}: unsupported file type; expected .jsonl/.json "
                                     "(optionally .gz or .zst) or .parquet")
            else:
                paths.append(m)
    seen: set[str] = set()
    files = []
    for p in paths:
        key = str(Path(p).resolve())
        if key not in seen:
            seen.add(key)
            fmt, comp = classify(p)  # type: ignore[misc]
            files.append(InputFile(p, fmt, comp, Path(p).stat().st_size))
    if not files:
        raise InputError(f"--input {' '.join(inputs)}: no .jsonl/.json(.gz/.zst) or .parquet file found")
    return files


def default_source_name(inputs: Sequence[str]) -> str:
    """`data/books.jsonl.zst` → books; `data/code/` or `data/code/*.jsonl` → code."""
    first = Path(inputs[0])
    parts = first.parts
    for i, part in enumerate(parts):
        if any(c in part for c in "*?["):
            return parts[i - 1] if i > 0 else "data"
    if first.is_dir():
        return first.resolve().name
    return first.name.split(".")[0] or "data"


def _open_stream(f: InputFile, raw):
    if f.compression == "gz":
        return gzip.GzipFile(fileobj=raw)
    if f.compression == "zst":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    return raw


def iter_blocks(file_index: int, f: InputFile, block_bytes: int, columns: Sequence[str],
                parquet_rows: int = 4096) -> Iterator[Block]:
    if f.format == "parquet":
        yield from _parquet_blocks(file_index, f, columns, parquet_rows)
    else:
        yield from _jsonl_blocks(file_index, f, block_bytes)


def _jsonl_blocks(file_index: int, f: InputFile, block_bytes: int) -> Iterator[Block]:
    """Blocks of whole lines, about `block_bytes` uncompressed each (a longer line is one block)."""
    with open(f.path, "rb") as raw:
        stream = _open_stream(f, raw)
        line, last_pos, pending = 1, 0, []  # pending: pieces of an unfinished line
        while True:
            try:
                chunk = stream.read(block_bytes)
            except (OSError, EOFError, ValueError) as e:  # corrupt gzip/zstd
                raise InputError(f"{f.path}: cannot decompress ({e}); the file is corrupt or truncated") from None
            if not chunk:
                break
            cut = chunk.rfind(b"\n")
            if cut < 0:
                pending.append(chunk)
                continue
            data = b"".join(pending + [chunk[:cut]]) if pending else chunk[:cut]
            pending = [chunk[cut + 1:]] if cut + 1 < len(chunk) else []
            pos = raw.tell()
            yield Block(file_index, line, data=data, raw_bytes=pos - last_pos)
            last_pos = pos
            line += data.count(b"\n") + 1
        rest = b"".join(pending)
        pos = raw.tell()
        if rest or pos > last_pos:
            yield Block(file_index, line, data=rest, raw_bytes=pos - last_pos)


def _parquet_blocks(file_index: int, f: InputFile, columns: Sequence[str], rows: int) -> Iterator[Block]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f.path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for non-Parquet files
        raise InputError(f"{f.path}: not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    missing = [c for c in columns if c not in names]
    if missing:
        raise InputError(f"{f.path}: no column {missing[0]!r} (columns: {', '.join(names)}); "
                         "choose the text column with --json-keys")
    total = max(pf.metadata.num_rows, 1)
    row, done_bytes = 1, 0
    for batch in pf.iter_batches(batch_size=rows, columns=list(dict.fromkeys(columns))):
        upto = (row - 1 + batch.num_rows) * f.size // total
        yield Block(file_index, row, columns={c: batch.column(c) for c in columns},
                    raw_bytes=upto - done_bytes)
        done_bytes = upto
        row += batch.num_rows


def _value(obj: dict, key: str, where: str, want_text: bool) -> str | BadRecord:
    """The field as a string, or why it cannot be used. Extra (group/sort) fields may be scalars."""
    if key not in obj or obj[key] is None:
        keys = ", ".join(list(obj)[:8])
        what = "is null" if key in obj else f"is absent (keys: {keys})"
        return BadRecord("missing_key", where, f"key {key!r} {what}")
    v = obj[key]
    if isinstance(v, bytes):  # Parquet binary columns
        try:
            v = v.decode("utf-8")
        except UnicodeDecodeError as e:
            return BadRecord("invalid_utf8", where, f"{key!r}: {e}")
    if not isinstance(v, str):
        if want_text or isinstance(v, (dict, list)):
            return BadRecord("non_string", where, f"{key!r} is of type {type(v).__name__}, expected a string")
        return json.dumps(v)
    if want_text:
        if not v:
            return BadRecord("empty_text", where, f"{key!r} is an empty string")
        if not v.isascii():
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                return BadRecord("invalid_utf8", where, f"{key!r} holds a lone surrogate escape ({e.reason})")
    return v


def _accept(out: ParsedBlock, obj: Any, line: int, where: str, keys: Sequence[str],
            extra: Sequence[str]) -> None:
    values = []
    for key, want_text in [(k, True) for k in keys] + [(k, False) for k in extra]:
        v = _value(obj, key, where, want_text)
        if isinstance(v, BadRecord):
            out.bad.append(v)
            return
        values.append(v)
    out.lines.append(line)
    for i in range(len(keys)):
        out.texts[i].append(values[i])
    for i in range(len(extra)):
        out.extras[i].append(values[len(keys) + i])


def parse_block(block: Block, path: str, keys: Sequence[str], extra: Sequence[str] = ()) -> ParsedBlock:
    """Splits a block into good records (their key texts and extra fields) and bad records."""
    out = ParsedBlock(texts=[[] for _ in keys], extras=[[] for _ in extra])
    if block.columns is not None:
        cols = {name: arr.to_pylist() for name, arr in block.columns.items()}
        n = len(next(iter(cols.values()))) if cols else 0
        for i in range(n):
            row = block.first_line + i
            obj = {name: values[i] for name, values in cols.items()}
            out.text_bytes += sum(len(v) for v in obj.values() if isinstance(v, (str, bytes)))
            _accept(out, obj, row, f"{path}:row {row}", keys, extra)
        out.records = n
        return out
    if not block.data:
        return out
    out.text_bytes = len(block.data)
    for i, raw in enumerate(block.data.split(b"\n")):
        if not raw.strip():
            out.blank_lines += 1
            continue
        out.records += 1
        line = block.first_line + i
        where = f"{path}:{line}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            out.bad.append(BadRecord("invalid_utf8", where, str(e)))
            continue
        try:
            obj = json.loads(text)
        except ValueError as e:
            out.bad.append(BadRecord("invalid_json", where, str(e)))
            continue
        if not isinstance(obj, dict):
            hint = " (megalong reads JSON Lines: one object per line)" if isinstance(obj, list) else ""
            out.bad.append(BadRecord("invalid_json", where, f"a JSON {type(obj).__name__}, not an object{hint}"))
            continue
        _accept(out, obj, line, where, keys, extra)
    return out
