"""Recall probes: needle-in-a-haystack and JSON key-value retrieval (HELMET's JsonKV), exact match.

Every prompt is assembled from separately encoded token pieces — prefix, haystack window, needle,
rest of the haystack, question — so the needle starts exactly at token `context_start +
round(depth · context_tokens)` and is never split or re-tokenized. Prompt + answer budget fit in the
stated length. Keys and values are drawn from a generator seeded per (probe, seed, length, depth,
sample), so a cell's prompts do not change when other lengths or depths are added, and a draw is
rejected unless the decoded prompt holds the value exactly once (the needle's) — a haystack can never
answer the question by accident.

Scoring: the model's greedy continuation, cut at EOD and at its first line, scored by its first
alphanumeric run; correct iff that run equals the answer exactly ("123." is "123"; "1234" is not).
"""
from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from megalong.eval.common import EvalError, check_lengths, format_length, iter_segments, open_token_dataset

NEEDLE_PREFIX = "A special magic number is hidden in the text below. Remember it, you will be asked for it.\n\n"
NEEDLE = " The special magic number for {key} is: {value}. "
NEEDLE_QUERY = "\n\nWhat is the special magic number for {key}? The special magic number for {key} is:"
JSONKV_PREFIX = "Extract the value corresponding to the specified key in the JSON object below.\n\n"
JSONKV_PAIR = '"{key}": "{value}"'
JSONKV_QUERY = '\n\nKey: "{key}"\nCorresponding value:'
PROBES = ("needle", "jsonkv")
MAX_DRAWS = 200


@dataclass
class RecallConfig:
    samples: int = 4  # prompts per (length, depth) cell
    max_new_tokens: int = 16  # answer budget; prompts leave this room inside the length
    value_digits: int = 7  # needle values: random numbers of this many digits (RULER's choice)
    key_chars: int = 8  # needle keys: random lowercase letters
    kv_chars: int = 8  # JsonKV keys and values: random hex strings
    add_bos: Optional[bool] = None  # default: when the tokenizer declares a BOS token

    def validate(self) -> None:
        if self.samples < 1 or not 1 <= self.max_new_tokens <= 16:
            raise EvalError(f"samples must be ≥ 1 and max_new_tokens 1–16 (got {self.samples}, {self.max_new_tokens})")
        if self.value_digits < 1 or self.key_chars < 1 or self.kv_chars < 1:
            raise EvalError("value_digits, key_chars and kv_chars must be ≥ 1")


@dataclass
class ProbeSample:
    probe: str
    length: int
    depth: float
    index: int
    prompt: np.ndarray  # int64 token ids
    key: str
    answer: str
    needle_start: int  # token index of the needle (JsonKV: the queried pair) in the prompt
    needle_tokens: int
    context_start: int  # the haystack / JSON object span in the prompt
    context_tokens: int

    @property
    def actual_depth(self) -> float:
        return (self.needle_start - self.context_start) / max(self.context_tokens, 1)


ANSWER_RUN = re.compile(r"[A-Za-z0-9]+")


def extract_answer(text: str) -> str:
    """The first alphanumeric run of the first non-empty line of a continuation ('' if none)."""
    line = text.lstrip().split("\n", 1)[0]
    m = ANSWER_RUN.search(line)
    return m.group(0) if m else ""


def exact_match(generated: str, answer: str) -> bool:
    return extract_answer(generated) == answer


def needle_offset(depth: float, context_tokens: int) -> int:
    """Tokens of haystack before the needle: depth · context rounded half up."""
    return int(math.floor(depth * context_tokens + 0.5))


def cell_rng(probe: str, seed: int, length: int, depth: float, index: int) -> np.random.Generator:
    return np.random.default_rng([PROBES.index(probe), seed, length, int(round(depth * 1_000_000)), index])


class Haystack:
    """Filler text: documents of a dataset in seeded order, EOD/BOS removed, joined by blank lines."""

    def __init__(self, prefix: str, tokenizer, seed: int, min_tokens: int):
        ds = open_token_dataset(prefix, "haystack source")
        if len(ds) == 0:
            raise EvalError(f"haystack source {prefix} is empty (0 documents); pass --haystack with a "
                            "document dataset of ordinary text")
        sep = np.asarray(tokenizer.encode("\n\n"), np.int64)
        order = np.random.default_rng([seed, 7]).permutation(len(ds))
        pieces, total = [], 0
        for seg in iter_segments(ds, order, drop_ids=(tokenizer.eod_id, tokenizer.bos_id)):
            pieces += [seg, sep]
            total += len(seg) + len(sep)
            if total >= min_tokens:
                break
        if total == 0:
            raise EvalError(f"haystack source {prefix} holds no text tokens (only EOD/padding); pass "
                            "--haystack with a document dataset of ordinary text")
        pool = np.concatenate(pieces)
        self.source_tokens = len(pool)
        self.repeated = len(pool) < min_tokens
        if self.repeated:
            pool = np.tile(pool, -(-min_tokens // len(pool)))
        self.pool, self.prefix = pool, str(prefix)

    def window(self, n: int, rng: np.random.Generator) -> np.ndarray:
        start = int(rng.integers(0, len(self.pool) - n + 1))
        return self.pool[start:start + n]


class PromptBuilder:
    """Builds probe samples for one tokenizer; see the module docstring for the guarantees."""

    def __init__(self, tokenizer, cfg: RecallConfig, haystack: Optional[Haystack] = None):
        cfg.validate()
        self.tok, self.cfg, self.haystack = tokenizer, cfg, haystack
        add_bos = cfg.add_bos if cfg.add_bos is not None else tokenizer.bos_id is not None
        if add_bos and tokenizer.bos_id is None:
            raise EvalError(f"add_bos is set but tokenizer {tokenizer.file} declares no BOS token")
        self.bos = [tokenizer.bos_id] if add_bos else []

    def _ids(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text), dtype=np.int64)

    def _too_short(self, probe: str, length: int, fixed: int) -> EvalError:
        return EvalError(f"{probe} probe at length {length}: its template alone needs {fixed} tokens plus "
                         f"{self.cfg.max_new_tokens} for the answer; use lengths of at least "
                         f"{fixed + self.cfg.max_new_tokens + 16}")

    def needle(self, length: int, depth: float, index: int, seed: int) -> ProbeSample:
        if self.haystack is None:
            raise EvalError("the needle probe needs a haystack: pass --haystack (or --data) with a document dataset")
        rng = cell_rng("needle", seed, length, depth, index)
        prefix = np.concatenate([np.asarray(self.bos, np.int64), self._ids(NEEDLE_PREFIX)])
        d = self.cfg.value_digits
        for _ in range(MAX_DRAWS):
            key = "".join(rng.choice(list(string.ascii_lowercase), self.cfg.key_chars))
            value = str(int(rng.integers(10 ** (d - 1), 10 ** d)))
            needle, query = self._ids(NEEDLE.format(key=key, value=value)), self._ids(NEEDLE_QUERY.format(key=key))
            fixed = len(prefix) + len(needle) + len(query)
            C = length - self.cfg.max_new_tokens - fixed
            if C < 1:
                raise self._too_short("needle", length, fixed)
            window = self.haystack.window(C, rng)
            hay_text = self.tok.decode(window.tolist())
            if value in hay_text or key in hay_text:
                continue
            at = needle_offset(depth, C)
            prompt = np.concatenate([prefix, window[:at], needle, window[at:], query])
            if self.tok.decode(prompt.tolist()).count(value) != 1:
                continue
            return ProbeSample("needle", length, depth, index, prompt, key, value, len(prefix) + at, len(needle),
                               len(prefix), C)
        raise EvalError(f"needle probe: {MAX_DRAWS} random key/value draws all occur in the haystack of "
                        f"{self.haystack.prefix} (length {length}); use a haystack of ordinary text or more "
                        "value digits")

    def jsonkv(self, length: int, depth: float, index: int, seed: int) -> ProbeSample:
        rng = cell_rng("jsonkv", seed, length, depth, index)
        prefix = np.concatenate([np.asarray(self.bos, np.int64), self._ids(JSONKV_PREFIX)])
        open_, close, sep = self._ids("{"), self._ids("}"), self._ids(", ")
        budget = length - self.cfg.max_new_tokens - len(prefix) - len(open_) - len(close)
        hexdigits = list("0123456789abcdef")
        for _ in range(MAX_DRAWS):
            pairs, pieces, used, longest_query, seen = [], [], 0, 0, set()
            while True:
                k = "".join(rng.choice(hexdigits, self.cfg.kv_chars))
                v = "".join(rng.choice(hexdigits, self.cfg.kv_chars))
                if k in seen or v in seen or k == v:
                    continue
                piece = self._ids(JSONKV_PAIR.format(key=k, value=v))
                extra = len(piece) + (len(sep) if pieces else 0)
                q = max(longest_query, len(self._ids(JSONKV_QUERY.format(key=k))))
                if used + extra + q > budget:
                    break
                seen.update((k, v))
                pairs.append((k, v))
                pieces.append(np.concatenate([sep, piece]) if pieces else piece)
                used, longest_query = used + extra, q
            if not pairs:
                raise self._too_short("jsonkv", length, len(prefix) + len(open_) + len(close) + len(piece) + q)
            starts = np.cumsum([0] + [len(p) for p in pieces[:-1]]) + np.array([0] + [len(sep)] * (len(pieces) - 1))
            j = int(np.argmin(np.abs(starts - depth * used)))
            key, value = pairs[j]
            query = self._ids(JSONKV_QUERY.format(key=key))
            context = np.concatenate([open_, *pieces, close])
            prompt = np.concatenate([prefix, context, query])
            text = self.tok.decode(prompt.tolist())
            if text.count(value) != 1 or text.count(key) != 2:
                continue
            start = len(prefix) + len(open_) + int(starts[j])
            return ProbeSample("jsonkv", length, depth, index, prompt, key, value, start,
                               len(self._ids(JSONKV_PAIR.format(key=key, value=value))), len(prefix), len(context))
        raise EvalError(f"jsonkv probe: could not draw unambiguous keys and values in {MAX_DRAWS} tries")

    def build(self, probe: str, lengths: Sequence[int], depths: Sequence[float], seed: int) -> list[ProbeSample]:
        if probe not in PROBES:
            raise EvalError(f"unknown probe {probe!r}; one of {', '.join(PROBES)}")
        make = self.needle if probe == "needle" else self.jsonkv
        return [make(L, d, i, seed) for L in lengths for d in depths for i in range(self.cfg.samples)]


def _answer_budget(tokenizer, samples: Sequence[ProbeSample], cap: int) -> int:
    """Tokens to generate: the longest answer's token count plus room to see where it ends."""
    return min(cap, max(len(tokenizer.encode(" " + s.answer)) for s in samples) + 4)


def _decode_answer(tokenizer, ids: Sequence[int]) -> str:
    ids = list(ids)
    if tokenizer.eod_id is not None and tokenizer.eod_id in ids:
        ids = ids[:ids.index(tokenizer.eod_id)]
    return tokenizer.decode(ids)


def evaluate_recall(adapter, tokenizer, probe: str, lengths: Sequence[int], depths: Sequence[float],
                    seed: int = 0, cfg: Optional[RecallConfig] = None, haystack_prefix: Optional[str] = None,
                    max_length_override: Optional[int] = None, max_batch_tokens: int = 16384,
                    progress: bool = True) -> dict:
    """Greedy exact-match accuracy of `adapter` per (depth, length) cell of one probe."""
    from tqdm import tqdm

    cfg = cfg or RecallConfig()
    lengths, depths = sorted(set(int(n) for n in lengths)), sorted(set(float(d) for d in depths))
    check_lengths(lengths, adapter.max_length, max_length_override, f"{probe} probe")
    haystack = None
    if probe == "needle":
        if not haystack_prefix:
            raise EvalError("the needle probe needs a haystack: pass --haystack (or --data) with a document dataset")
        haystack = Haystack(haystack_prefix, tokenizer, seed, min_tokens=2 * max(lengths))
    samples = PromptBuilder(tokenizer, cfg, haystack).build(probe, lengths, depths, seed)
    groups: dict[int, list[ProbeSample]] = {}
    for s in samples:
        groups.setdefault(len(s.prompt), []).append(s)
    records = []
    bar = tqdm(total=len(samples), desc=f"{probe} {adapter.name}", unit="prompt", disable=not progress)
    for n, group in sorted(groups.items()):
        per_batch = max(1, max_batch_tokens // (n + cfg.max_new_tokens))
        for a in range(0, len(group), per_batch):
            batch = group[a:a + per_batch]
            budget = _answer_budget(tokenizer, batch, cfg.max_new_tokens)
            out = adapter.greedy_generate(torch.from_numpy(np.stack([s.prompt for s in batch])), budget,
                                          vocab_limit=tokenizer.vocab_size)
            for s, ids in zip(batch, out.tolist()):
                text = _decode_answer(tokenizer, ids)
                records.append({"length": s.length, "depth": s.depth, "index": s.index, "key": s.key,
                                "answer": s.answer, "generated": text, "extracted": extract_answer(text),
                                "correct": exact_match(text, s.answer), "prompt_tokens": int(len(s.prompt)),
                                "needle_start": s.needle_start, "actual_depth": round(s.actual_depth, 6)})
            bar.update(len(batch))
    bar.close()
    records.sort(key=lambda r: (r["length"], r["depth"], r["index"]))
    return summarize_recall(probe, adapter.describe(), lengths, depths, records, seed, cfg,
                            haystack_info=None if haystack is None else {
                                "prefix": haystack.prefix, "source_tokens": haystack.source_tokens,
                                "repeated": haystack.repeated})


def summarize_recall(probe: str, model: dict, lengths: list[int], depths: list[float], records: list[dict],
                     seed: int, cfg: RecallConfig, haystack_info: Optional[dict] = None) -> dict:
    acc = np.zeros((len(depths), len(lengths)))
    cells = []
    for i, d in enumerate(depths):
        for j, L in enumerate(lengths):
            hits = [r["correct"] for r in records if r["length"] == L and r["depth"] == d]
            acc[i, j] = sum(hits) / len(hits) if hits else float("nan")
            cells.append({"length": L, "depth": d, "correct": int(sum(hits)), "total": len(hits),
                          "accuracy": acc[i, j]})
    return {"probe": probe, "model": model, "seed": seed, "config": vars(cfg).copy(), "lengths": lengths,
            "depths": depths, "accuracy": acc.tolist(), "cells": cells,
            "by_length": {str(L): float(np.mean([r["correct"] for r in records if r["length"] == L])) for L in lengths},
            "mean_accuracy": float(np.mean([r["correct"] for r in records])) if records else None,
            "haystack": haystack_info, "samples": records}


def format_recall_table(result: dict) -> str:
    """Console table: depth rows × length columns of exact-match accuracy, with counts."""
    lengths, depths = result["lengths"], result["depths"]
    lines = [f"{result['probe']} exact match ({result['model']['name']}), rows = depth, columns = length",
             "depth".ljust(8) + "".join(format_length(L).rjust(10) for L in lengths)]
    for i, d in enumerate(depths):
        row = [c for c in result["cells"] if c["depth"] == d]
        lines.append(f"{d:.2f}".ljust(8) + "".join(f"{c['correct']}/{c['total']}".rjust(10) for c in row))
    lines.append("mean".ljust(8) + "".join(f"{100 * result['by_length'][str(L)]:.0f}%".rjust(10) for L in lengths))
    if result.get("haystack") and result["haystack"].get("repeated"):
        lines.append(f"note: the haystack source has only {result['haystack']['source_tokens']:,} tokens and repeats")
    return "\n".join(lines)
