"""What every probe shares: the error type, length parsing and checks, tokenizer identity checks,
and reading token documents (haystacks, held-out text) from megalong datasets.

Probes work on token ids end to end: prompts are built from separately encoded pieces and never
decoded and re-encoded, so a position stated in tokens is the position the model sees.
"""
from __future__ import annotations

import re
from typing import Any, Iterator, Sequence

import numpy as np


class EvalError(ValueError):
    """A bad evaluation input; the message names the value, where it came from and what to do."""


# ---------------------------------------------------------------- lengths and depths

_LENGTH = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")


def parse_length(text: str) -> int:
    """'4096', '4K' (=4096), '1M' (=1048576)."""
    m = _LENGTH.match(str(text))
    if not m:
        raise EvalError(f"length {text!r} is not a token count; write e.g. 4096, 4K or 128K")
    value = float(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]
    if value != int(value) or value < 1:
        raise EvalError(f"length {text!r} is not a positive whole number of tokens")
    return int(value)


def parse_lengths(text: str | Sequence) -> list[int]:
    items = text.split(",") if isinstance(text, str) else list(text)
    lengths = [parse_length(x) if isinstance(x, str) else int(x) for x in items if str(x).strip()]
    if not lengths:
        raise EvalError(f"no lengths in {text!r}; write e.g. 1K,2K,4K")
    return sorted(set(lengths))


def parse_depths(text: str | Sequence) -> list[float]:
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        depths = [float(x) for x in items if str(x).strip()]
    except ValueError:
        raise EvalError(f"depths {text!r} must be numbers between 0 and 1, e.g. 0,0.25,0.5,0.75,1") from None
    bad = [d for d in depths if not 0.0 <= d <= 1.0]
    if not depths or bad:
        raise EvalError(f"depths {text!r} must be numbers between 0 and 1 (got {bad or 'none'}); "
                        "a depth is the fraction of the context before the needle")
    return sorted(set(depths))


def default_lengths(max_length: int, smallest: int = 1024) -> list[int]:
    """Powers of two from 1K (or the max, if smaller) up to the model's maximum, and the maximum."""
    out, n = [], min(smallest, max_length)
    while n < max_length:
        out.append(n)
        n *= 2
    return out + [max_length]


def format_length(n: int) -> str:
    if n >= 1024 * 1024 and n % (1024 * 1024) == 0:
        return f"{n // (1024 * 1024)}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}K"
    return str(n)


def check_lengths(lengths: Sequence[int], model_max: int, override: int | None, what: str) -> int:
    """The maximum length allowed; error for any length above it (the model's, unless overridden)."""
    limit = int(override) if override else int(model_max)
    too_long = [n for n in lengths if n > limit]
    if too_long:
        if override:
            raise EvalError(f"{what}: length(s) {too_long} exceed --max-length-override {limit}")
        raise EvalError(f"{what}: length(s) {too_long} exceed the model's maximum of {model_max} tokens "
                        f"(its max_position_embeddings); pass --max-length-override {max(too_long)} to "
                        "evaluate beyond what the model was configured for")
    return limit


# ---------------------------------------------------------------- tokenizer identity

IDENTITY_KEYS = ("type", "sha256", "vocab_size", "eod_id", "bos_id")


def tokenizer_identity(desc: dict | None) -> dict:
    """The fields of `describe()` that decide the ids (the path does not)."""
    return {k: (desc or {}).get(k) for k in IDENTITY_KEYS}


def _same_ids(tokenizer, other_desc: dict) -> bool:
    """Same ids on probe texts, for tokenizer files that differ only in serialisation."""
    from megalong.data.tokenizer import load_tokenizer, probe_texts

    try:
        other = load_tokenizer(other_desc["type"], other_desc["path"], other_desc.get("eod_id"),
                               other_desc.get("bos_id"), backend="reference")
    except Exception:  # the other file is gone or unreadable: identity cannot be shown
        return False
    texts = probe_texts()[:120]
    return other.vocab_size == tokenizer.vocab_size and other.encode_batch(texts) == tokenizer.encode_batch(texts)


def check_tokenizer(tokenizer, expected: dict | None, where: str) -> str:
    """Errors when `tokenizer` is not the one `expected` (a `describe()` dict from `where`) records.

    Returns a note for the summary. Files whose bytes differ but whose ids agree on the probe texts
    (e.g. a tokenizer.json re-saved by transformers) are accepted, and the note says so."""
    if not expected:
        return f"{where} does not record its tokenizer: not checked"
    mine, theirs = tokenizer_identity(tokenizer.describe()), tokenizer_identity(expected)
    diff = [k for k in IDENTITY_KEYS if theirs.get(k) is not None and mine[k] != theirs[k]]
    if not diff:
        return f"tokenizer matches {where}"
    if diff == ["sha256"] and _same_ids(tokenizer, expected):
        return f"tokenizer file differs from {where}'s but gives identical ids on probe texts"
    detail = "; ".join(f"{k}: {mine[k]!r} here vs {theirs[k]!r} in {where}" for k in diff)
    raise EvalError(f"tokenizer mismatch: {tokenizer.file} is not the tokenizer of {where} ({detail}); "
                    f"pass --tokenizer {expected.get('path', '<the tokenizer it was made with>')} or "
                    "re-tokenize the data with this tokenizer")


def find_tokenizer_record(meta: Any) -> dict | None:
    """The first `tokenizer` entry with a sha256 anywhere in a (checkpoint) meta dict, else None."""
    if isinstance(meta, dict):
        tok = meta.get("tokenizer")
        if isinstance(tok, dict) and tok.get("sha256"):
            return tok
        for value in meta.values():
            found = find_tokenizer_record(value)
            if found is not None:
                return found
    elif isinstance(meta, list):
        for value in meta:
            found = find_tokenizer_record(value)
            if found is not None:
                return found
    return None


def checkpoint_tokenizer_record(meta: dict) -> dict | None:
    """The tokenizer a checkpoint was trained with: a `tokenizer` entry in its megalong.json, else the
    one recorded in the `.meta.json` of a training dataset its config names (data.datasets[].path)."""
    import json
    from pathlib import Path

    found = find_tokenizer_record(meta)
    if found is not None:
        return found
    datasets = (((meta.get("config") or {}).get("data") or {}).get("datasets")) or []
    for entry in datasets if isinstance(datasets, list) else []:
        path = Path(f"{entry.get('path', '')}.meta.json") if isinstance(entry, dict) else None
        if path is not None and path.is_file():
            try:
                tok = json.loads(path.read_text()).get("tokenizer")
            except ValueError:
                continue
            if isinstance(tok, dict) and tok.get("sha256"):
                return tok
    return None


# ---------------------------------------------------------------- token documents from datasets


def open_token_dataset(prefix: str, what: str = "dataset"):
    """A document or packed dataset as samples (`PackedSample`s), with a clear error when absent or empty."""
    from pathlib import Path

    from megalong.data.packed_dataset import DatasetError, open_samples

    bin_file = Path(f"{prefix}.bin")
    if bin_file.is_file() and bin_file.stat().st_size == 0 and Path(f"{prefix}.meta.json").is_file():
        raise EvalError(f"{what} {prefix} is empty (0 documents, 0 tokens); pass a dataset that holds text")
    try:
        return open_samples(str(prefix))
    except DatasetError as e:
        raise EvalError(f"{what}: {e}") from None


def dataset_tokenizer(prefix: str) -> dict | None:
    return open_token_dataset(prefix).meta.get("tokenizer")


def iter_segments(ds, order: Sequence[int], drop_ids: Sequence[int] = ()) -> Iterator[np.ndarray]:
    """Token segments (documents) of the samples in `order`, without padding/EOD ids, never empty.

    A packed sample yields each of its segments whose target mask is not all zero (padding is)."""
    drop = np.asarray(sorted({int(i) for i in drop_ids if i is not None}), dtype=np.int64)
    for i in order:
        sample = ds[int(i)]
        bounds = np.concatenate([[0], np.cumsum(sample.doc_lengths)])
        for a, b in zip(bounds[:-1], bounds[1:]):
            if not np.any(np.asarray(sample.target_mask[a:b]) != 0):
                continue
            seg = np.asarray(sample.tokens[a:b], dtype=np.int64)
            if len(drop):
                seg = seg[~np.isin(seg, drop)]
            if len(seg):
                yield seg
