"""Raw text → tokenized document datasets (DESIGN §1): the engine behind `tools/preprocess_data.py`.

Input files are cut into blocks of records; worker processes parse, validate and tokenize a block and
return its tokens as one array; the main process writes the arrays in input order. Blocks do not
depend on the worker count, so the output bytes do not either. One dataset is written per json key,
`{output_prefix}_{key}_document` (Megatron-LM's naming), each with a `.meta.json` that counts every
record and names the skipped ones by file and line.

Code repositories (ProLong): `group_by` concatenates the records sharing a key (e.g. `repo`), ordered
by `sort_by` (e.g. `path`), into one long document. Grouping needs all records at once, so it holds
the texts of the input in memory — run it per shard of repositories for very large inputs.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterable, Iterator, Optional

import numpy as np

import megalong
from megalong.data.indexed import DatasetWriter, has_leftovers, is_complete, token_dtype
from megalong.data.readers import (REASONS, BadRecord, Block, InputFile, default_source_name,
                                   expand_inputs, iter_blocks, parse_block)
from megalong.data.tokenizer import load_tokenizer


class PreprocessError(ValueError):
    """A run that cannot start or finish as configured; the message says what to change."""


class BadRecordError(PreprocessError):
    """`strict` mode met a bad record; the message is `file:line: reason: detail`."""


@dataclass
class PreprocessConfig:
    input: list[str]  # JSONL(.gz/.zst) / Parquet files, globs or directories
    output_prefix: str  # datasets go to {output_prefix}_{key}_document.{bin,idx,meta.json}
    tokenizer_model: str  # tokenizer.json, a HF tokenizer directory, or a SentencePiece .model
    tokenizer_type: str = "HuggingFaceTokenizer"
    tokenizer_backend: str = "auto"  # auto | gigatoken | reference
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    append_eod: bool = True
    prepend_bos: bool = False
    eod_id: Optional[int] = None
    bos_id: Optional[int] = None
    source_name: Optional[str] = None  # default: from the first input's name
    group_by: Optional[str] = None
    sort_by: Optional[str] = None
    group_separator: str = "\n\n"
    workers: int = 0  # 0: every available core
    chunk_bytes: int = 2 * 1024 * 1024
    strict: bool = False
    overwrite: bool = False
    progress: bool = True
    log_interval: int = 100_000  # documents between progress lines when stderr is not a terminal
    max_examples: int = 10  # bad-record examples kept per reason


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def output_prefixes(cfg: PreprocessConfig) -> dict[str, str]:
    return {key: f"{cfg.output_prefix}_{key}_document" for key in cfg.json_keys}


# ----------------------------------------------------------------------------- worker side


@dataclass
class _Job:
    """What a worker needs; inherited through fork (or pickled, tokenizer rebuilt, with spawn)."""

    tokenizer: object
    paths: list[str]
    keys: list[str]
    bos_id: Optional[int]
    eod_id: Optional[int]
    dtype: type


@dataclass
class TextBatch:
    """Documents assembled in the main process (grouped mode): texts per key and their locations."""

    texts: list[list[str]]
    locations: list[str]


@dataclass
class ChunkResult:
    tokens: list[np.ndarray]  # per key: the documents' tokens, concatenated, in the output dtype
    lengths: list[np.ndarray]  # per key: each document's length (with BOS/EOD)
    bad: list[BadRecord]
    records: int = 0
    blank_lines: int = 0
    text_bytes: int = 0
    raw_bytes: int = 0


_JOB: Optional[_Job] = None


def _init_worker(job: _Job) -> None:
    global _JOB
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker; --workers sets the cores
    _JOB = job


def add_specials(flat: np.ndarray, lengths: np.ndarray, bos: Optional[int], eod: Optional[int],
                 dtype) -> tuple[np.ndarray, np.ndarray]:
    """Inserts BOS before and EOD after every document of a concatenation, casting to `dtype`."""
    extra = (bos is not None) + (eod is not None)
    new_lengths = lengths + extra
    if extra == 0:
        return flat.astype(dtype), new_lengths
    ends = np.cumsum(new_lengths)
    out = np.empty(int(ends[-1]) if len(ends) else 0, dtype)
    is_text = np.ones(len(out), bool)
    if bos is not None:
        out[ends - new_lengths] = bos
        is_text[ends - new_lengths] = False
    if eod is not None:
        out[ends - 1] = eod
        is_text[ends - 1] = False
    out[is_text] = flat
    return out, new_lengths


def encode_item(item: Block | TextBatch) -> ChunkResult:
    """Parses (for a Block) and tokenizes one work item; runs in a worker process."""
    job = _JOB
    assert job is not None, "encode_item called outside a worker"
    if isinstance(item, Block):
        path = job.paths[item.file_index]
        parsed = parse_block(item, path, job.keys)
        texts, bad = parsed.texts, parsed.bad
        lines = parsed.lines
        location = lambda i: f"{path}:row {lines[i]}" if item.columns is not None else f"{path}:{lines[i]}"
        result = ChunkResult([], [], bad, parsed.records, parsed.blank_lines, parsed.text_bytes, item.raw_bytes)
    else:
        texts = item.texts
        location = item.locations.__getitem__
        result = ChunkResult([], [], [], 0, 0, 0, 0)
    encoded = [job.tokenizer.encode_flat(t) for t in texts]
    keep = np.ones(len(texts[0]), bool)
    for key, (_, lengths) in zip(job.keys, encoded):
        for i in np.flatnonzero(keep & (lengths == 0)):
            result.bad.append(BadRecord("empty_text", location(int(i)),
                                        f"{key!r} has no tokens (only characters the tokenizer drops)"))
        keep &= lengths > 0
    for flat, lengths in encoded:
        if not keep.all():
            flat, lengths = flat[np.repeat(keep, lengths)], lengths[keep]
        tokens, lengths = add_specials(flat, lengths, job.bos_id, job.eod_id, job.dtype)
        result.tokens.append(tokens)
        result.lengths.append(lengths)
    return result


def _results(items: Iterable[Block | TextBatch], job: _Job, workers: int) -> Iterator[ChunkResult]:
    """Work items → results in input order, `workers` processes at a time, a bounded number in flight."""
    global _JOB
    if workers <= 1:
        _JOB = job
        try:
            yield from map(encode_item, items)
        finally:
            _JOB = None
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(workers, initializer=_init_worker, initargs=(job,)) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.apply_async(encode_item, (item,)))
            if len(pending) >= 2 * workers + 2:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ----------------------------------------------------------------------------- main side


class _Stats:
    def __init__(self, cfg: PreprocessConfig) -> None:
        self.cfg = cfg
        self.t0 = time.time()
        self.records = self.blank_lines = self.text_bytes = self.raw_bytes = 0
        self.documents = self.tokens = 0
        self.grouped_records = 0
        self.skipped = {r: {"count": 0, "examples": []} for r in REASONS}

    def add_bad(self, bad: list[BadRecord]) -> None:
        if bad and self.cfg.strict:
            b = bad[0]
            raise BadRecordError(f"{b.location}: {b.reason}: {b.detail} (--strict stops at the first bad record)")
        for b in bad:
            entry = self.skipped[b.reason]
            entry["count"] += 1
            if len(entry["examples"]) < self.cfg.max_examples:
                entry["examples"].append(f"{b.location}: {b.detail}")

    @property
    def total_skipped(self) -> int:
        return sum(e["count"] for e in self.skipped.values())

    def rates(self) -> str:
        dt = max(time.time() - self.t0, 1e-9)
        return (f"{self.documents / dt:,.0f} docs/s, {self.tokens / dt / 1e6:.2f}M tok/s, "
                f"{self.text_bytes / dt / 1e6:.1f} MB/s")


class _Progress:
    """A tqdm bar on a terminal; a plain line every `log_interval` documents otherwise (logs)."""

    def __init__(self, stats: _Stats, total: int, unit: str, desc: str) -> None:
        from tqdm import tqdm

        cfg = stats.cfg
        self.stats = stats
        tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, unit=unit, unit_scale=True, desc=desc, dynamic_ncols=True,
                        disable=not (cfg.progress and tty), mininterval=0.5)
        self.plain = cfg.progress and not tty
        self.interval = max(cfg.log_interval, 1)
        self.next_log = self.interval

    def update(self, n: int) -> None:
        self.bar.update(n)
        self.bar.set_postfix_str(self.stats.rates(), refresh=False)
        if self.plain and self.stats.documents >= self.next_log:
            print(f"processed {self.stats.documents:,} documents ({self.stats.rates()})", file=sys.stderr)
            self.next_log += self.interval

    def close(self) -> None:
        self.bar.close()


def _block_items(files: list[InputFile], cfg: PreprocessConfig) -> Iterator[Block]:
    for i, f in enumerate(files):
        yield from iter_blocks(i, f, cfg.chunk_bytes, cfg.json_keys)


def _grouped_items(files: list[InputFile], cfg: PreprocessConfig, stats: _Stats) -> Iterator[TextBatch]:
    """Reads every record, groups by `group_by`, orders by `sort_by`, joins — then batches documents."""
    extra = [cfg.group_by] + ([cfg.sort_by] if cfg.sort_by else [])
    groups: dict[str, list] = {}
    progress = _Progress(stats, sum(f.size for f in files), "B", "grouping")
    seq = 0
    for i, f in enumerate(files):
        for block in iter_blocks(i, f, cfg.chunk_bytes, cfg.json_keys + extra):
            parsed = parse_block(block, f.path, cfg.json_keys, extra)
            stats.add_bad(parsed.bad)
            stats.records += parsed.records
            stats.blank_lines += parsed.blank_lines
            stats.text_bytes += parsed.text_bytes
            stats.raw_bytes += block.raw_bytes
            row = "row " if block.columns is not None else ""
            for j, line in enumerate(parsed.lines):
                sort_value = parsed.extras[1][j] if cfg.sort_by else ""
                groups.setdefault(parsed.extras[0][j], []).append(
                    (sort_value, seq, [t[j] for t in parsed.texts], f"{f.path}:{row}{line}"))
                seq += 1
            progress.update(block.raw_bytes)
    progress.close()
    batch = TextBatch([[] for _ in cfg.json_keys], [])
    size = 0
    for name, members in groups.items():
        members.sort(key=lambda m: (m[0], m[1]))
        stats.grouped_records += len(members)
        for k in range(len(cfg.json_keys)):
            batch.texts[k].append(cfg.group_separator.join(m[2][k] for m in members))
            size += len(batch.texts[k][-1])
        batch.locations.append(f"group {cfg.group_by}={name!r} ({len(members)} records, first at {members[0][3]})")
        if size >= cfg.chunk_bytes:
            yield batch
            batch, size = TextBatch([[] for _ in cfg.json_keys], []), 0
    if batch.locations:
        yield batch


def _check_config(cfg: PreprocessConfig) -> None:
    if not cfg.json_keys or len(set(cfg.json_keys)) != len(cfg.json_keys):
        raise PreprocessError(f"--json-keys {cfg.json_keys}: give one or more distinct keys")
    if cfg.sort_by and not cfg.group_by:
        raise PreprocessError("--sort-by orders the records of a group: it needs --group-by")
    if cfg.group_by and cfg.group_by in cfg.json_keys:
        raise PreprocessError(f"--group-by {cfg.group_by!r} is also a --json-keys text key")
    if cfg.workers < 0:
        raise PreprocessError(f"--workers {cfg.workers}: must be >= 1 (or 0 for every available core)")
    if cfg.chunk_bytes < 1024:
        raise PreprocessError(f"--chunk-bytes {cfg.chunk_bytes}: must be at least 1024")


def _check_outputs(cfg: PreprocessConfig) -> None:
    for prefix in output_prefixes(cfg).values():
        if is_complete(prefix) and not cfg.overwrite:
            raise PreprocessError(f"{prefix}.bin/.idx/.meta.json already exist (a complete dataset); "
                                  "pass --overwrite to replace it, or choose another --output-prefix")
        if has_leftovers(prefix):
            print(f"note: {prefix} is an incomplete dataset (no .meta.json, an interrupted run?); "
                  "it will be replaced", file=sys.stderr)


@contextlib.contextmanager
def _single_threaded_tokenizers():
    """HF `encode_batch` would spread over every core; `workers` is the number of cores to use."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def preprocess(cfg: PreprocessConfig) -> list[dict]:
    """Runs the whole conversion; returns the `.meta.json` of each dataset written (one per key)."""
    _check_config(cfg)
    files = expand_inputs(cfg.input)
    tok = load_tokenizer(cfg.tokenizer_type, cfg.tokenizer_model, cfg.eod_id, cfg.bos_id, cfg.tokenizer_backend)
    if cfg.append_eod and tok.eod_id is None:
        raise PreprocessError(f"tokenizer {tok.file} declares no end-of-document token; pass --eod-id ID "
                              "(or --no-append-eod)")
    if cfg.prepend_bos and tok.bos_id is None:
        raise PreprocessError(f"tokenizer {tok.file} declares no BOS token; pass --bos-id ID")
    _check_outputs(cfg)
    workers = cfg.workers or available_cpus()
    dtype = token_dtype(tok.vocab_size)
    job = _Job(tok, [f.path for f in files], list(cfg.json_keys), tok.bos_id if cfg.prepend_bos else None,
               tok.eod_id if cfg.append_eod else None, dtype)
    stats = _Stats(cfg)
    print(f"megalong preprocess: {len(files)} input file(s), {sum(f.size for f in files) / 1e6:,.1f} MB; "
          f"tokenizer {tok.backend_note}; {workers} worker(s)", file=sys.stderr)
    prefixes = output_prefixes(cfg)
    with contextlib.ExitStack() as stack:
        writers = [stack.enter_context(DatasetWriter(p, dtype)) for p in prefixes.values()]
        stack.enter_context(_single_threaded_tokenizers())
        if cfg.group_by:
            items: Iterable = list(_grouped_items(files, cfg, stats))
            progress = _Progress(stats, sum(len(b.locations) for b in items), "doc", "tokenizing")
        else:
            items = _block_items(files, cfg)
            progress = _Progress(stats, sum(f.size for f in files), "B", "tokenizing")
        for res in _results(items, job, workers):
            stats.add_bad(res.bad)
            for w, tokens, lengths in zip(writers, res.tokens, res.lengths):
                w.add_documents(tokens, lengths)
            stats.records += res.records
            stats.blank_lines += res.blank_lines
            stats.text_bytes += res.text_bytes
            stats.raw_bytes += res.raw_bytes
            stats.documents += len(res.lengths[0])
            stats.tokens += int(res.lengths[0].sum())
            progress.update(len(res.lengths[0]) if cfg.group_by else res.raw_bytes)
        progress.close()
        elapsed = time.time() - stats.t0
        metas = [w.commit(_meta(cfg, key, tok, files, stats, w, workers, elapsed))
                 for key, w in zip(prefixes, writers)]
    _print_summary(cfg, stats, prefixes, dtype, elapsed, workers)
    return metas


def _meta(cfg: PreprocessConfig, key: str, tok, files: list[InputFile], stats: _Stats, writer: DatasetWriter,
          workers: int, elapsed: float) -> dict:
    counts = {"records": stats.records, "documents": writer.num_documents, "tokens": writer.num_tokens,
              "skipped": stats.total_skipped, "blank_lines": stats.blank_lines,
              "input_bytes": sum(f.size for f in files), "uncompressed_bytes": stats.text_bytes}
    if cfg.group_by:
        counts["grouped_records"] = stats.grouped_records
    return {
        "kind": "documents",
        "format_version": 1,
        "source_name": cfg.source_name or default_source_name(cfg.input),
        "json_key": key,
        "tokenizer": tok.describe(),
        "tokenizer_backend": tok.backend_note,
        "dtype": np.dtype(writer.dtype).name,
        "append_eod": cfg.append_eod,
        "prepend_bos": cfg.prepend_bos,
        "group_by": ({"key": cfg.group_by, "sort_by": cfg.sort_by, "separator": cfg.group_separator}
                     if cfg.group_by else None),
        "counts": counts,
        "skipped": stats.skipped,
        "inputs": [{"path": f.path, "bytes": f.size} for f in files],
        "tool": {"name": "megalong preprocess_data", "version": megalong.__version__,
                 "argv": sys.argv[1:], "workers": workers, "elapsed_s": round(elapsed, 3)},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _print_summary(cfg: PreprocessConfig, stats: _Stats, prefixes: dict[str, str], dtype, elapsed: float,
                   workers: int) -> None:
    dt = max(elapsed, 1e-9)
    print(f"done in {elapsed:.1f} s with {workers} worker(s): {stats.records:,} records → "
          f"{stats.documents:,} documents, {stats.tokens:,} tokens ({stats.documents / dt:,.0f} docs/s, "
          f"{stats.tokens / dt / 1e6:.2f}M tok/s, {stats.text_bytes / dt / 1e6:.1f} MB/s)")
    for key, prefix in prefixes.items():
        print(f"  {key}: {prefix}.bin/.idx/.meta.json ({np.dtype(dtype).name})")
    if stats.total_skipped:
        print(f"  skipped {stats.total_skipped:,} bad records (details in .meta.json):")
        for reason, entry in stats.skipped.items():
            if entry["count"]:
                print(f"    {reason}: {entry['count']:,}, e.g. {entry['examples'][0]}")
    else:
        print("  no bad records")
