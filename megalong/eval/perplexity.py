"""Perplexity by position: loss on held-out long documents, averaged in buckets of token position.

A token's *position* is its index inside its own document (the number of tokens of context the
model had for it); the first token of a document is never predicted. Bucket k holds positions
[k·size, (k+1)·size). Averages are Σ CE / count per bucket, over every evaluated document, so a
curve that falls with position shows the model using long context (ProLong §2: perplexity is a
sanity check, the recall probes and HELMET are what count).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from megalong.eval.common import EvalError, open_token_dataset


def default_bucket_size(length: int) -> int:
    """A power of two giving 16–32 buckets: 1K buckets at 32K, 4K at 128K, 32 at 1K."""
    size = 1
    while size * 32 < length:
        size *= 2
    return size


def target_positions(doc_lengths, S: int) -> np.ndarray:
    """For CE entry t (predicting token t+1): the position of token t+1 in its document [S-1]."""
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    if lengths.sum() != S:
        raise EvalError(f"document lengths {lengths.tolist()} do not sum to the sample length {S}")
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return (np.arange(S, dtype=np.int64) - starts)[1:]


@dataclass
class PositionBuckets:
    """Accumulates Σ CE and token counts per position bucket (float64, exact for the counts)."""

    bucket_size: int
    length: int
    sums: np.ndarray = field(init=False)
    counts: np.ndarray = field(init=False)

    def __post_init__(self):
        if self.bucket_size < 1:
            raise EvalError(f"bucket size must be ≥ 1, got {self.bucket_size}")
        n = -(-self.length // self.bucket_size)
        self.sums, self.counts = np.zeros(n), np.zeros(n, dtype=np.int64)

    def add(self, ce: np.ndarray, positions: np.ndarray, weights: Optional[np.ndarray] = None) -> None:
        """ce/positions/weights [n]: entries with weight 0 (or NaN CE, or position 0) are skipped."""
        ce, positions = np.asarray(ce, dtype=np.float64), np.asarray(positions, dtype=np.int64)
        keep = ~np.isnan(ce) & (positions > 0)
        if weights is not None:
            keep &= np.asarray(weights) > 0
        if np.any(positions[keep] >= self.length):
            raise EvalError(f"position {int(positions[keep].max())} is beyond the evaluated length {self.length}")
        idx = positions[keep] // self.bucket_size
        self.sums += np.bincount(idx, weights=ce[keep], minlength=len(self.sums))
        self.counts += np.bincount(idx, minlength=len(self.counts))

    def table(self) -> list[dict]:
        rows = []
        for k, (s, c) in enumerate(zip(self.sums, self.counts)):
            mean = float(s / c) if c else None
            rows.append({"start": k * self.bucket_size, "end": min((k + 1) * self.bucket_size, self.length),
                         "tokens": int(c), "mean_loss": mean, "ppl": math.exp(mean) if mean is not None else None})
        return rows

    def overall(self) -> tuple[Optional[float], int]:
        n = int(self.counts.sum())
        return (float(self.sums.sum() / n) if n else None), n


def select_samples(prefix: str, length: int, num_docs: int, seed: int) -> tuple[list, dict]:
    """`num_docs` seeded samples of the dataset cut to `length` tokens, with their documents and masks.

    A document dataset contributes documents of at least `length` tokens (their first `length`); a
    packed dataset contributes whole samples (their segments stay separate documents)."""
    ds = open_token_dataset(prefix, "--data")
    kind = ds.meta.get("kind")
    if kind == "documents":
        lengths = ds.lengths()
        candidates = np.flatnonzero(lengths >= length)
        if len(candidates) == 0:
            longest = int(lengths.max()) if len(lengths) else 0
            raise EvalError(f"--data {prefix}: no document has {length} tokens (the longest has {longest}); "
                            f"pass --ppl-length {longest} or less, or held-out data with longer documents")
    else:
        if ds.seq_length < length:
            raise EvalError(f"--data {prefix}: packed samples have {ds.seq_length} tokens, fewer than the "
                            f"{length} asked for; pass --ppl-length {ds.seq_length} or a longer dataset")
        candidates = np.arange(len(ds))
    order = np.random.default_rng(seed).permutation(candidates)[:num_docs]
    out = []
    for i in sorted(order.tolist()):
        s = ds[int(i)]
        ends = np.minimum(np.cumsum(s.doc_lengths), length)
        doc_lengths = np.diff(np.concatenate([[0], ends]))
        out.append((np.asarray(s.tokens[:length], np.int64), doc_lengths[doc_lengths > 0],
                    np.asarray(s.target_mask[:length], np.float32)))
    info = {"prefix": str(prefix), "kind": kind, "candidates": int(len(candidates)), "selected": len(out),
            "indices": sorted(int(i) for i in order)}
    return out, info


def evaluate_perplexity(adapter, prefix: str, length: int, num_docs: int = 8, seed: int = 0,
                        bucket_size: Optional[int] = None, max_batch_tokens: int = 16384,
                        progress: bool = True) -> dict:
    """Per-position-bucket loss of `adapter` on `num_docs` samples of `length` tokens from `prefix`."""
    from tqdm import tqdm

    samples, info = select_samples(prefix, length, num_docs, seed)
    buckets = PositionBuckets(bucket_size or default_bucket_size(length), length)
    per_batch = max(1, max_batch_tokens // length)
    bar = tqdm(total=len(samples), desc=f"ppl {adapter.name} @{length}", unit="doc", disable=not progress)
    for a in range(0, len(samples), per_batch):
        batch = samples[a:a + per_batch]
        tokens = torch.from_numpy(np.stack([t for t, _, _ in batch]))
        ce = adapter.token_losses(tokens, [d.tolist() for _, d, _ in batch]).numpy()
        for row, (_, docs, mask) in zip(ce, batch):
            buckets.add(row, target_positions(docs, length), mask[1:])
        bar.update(len(batch))
    bar.close()
    mean, n = buckets.overall()
    return {"probe": "ppl", "model": adapter.describe(), "data": info, "length": length,
            "bucket_size": buckets.bucket_size, "seed": seed, "tokens": n, "mean_loss": mean,
            "ppl": math.exp(mean) if mean is not None else None, "buckets": buckets.table()}


def format_ppl_table(results: list[dict]) -> str:
    """Console table: one column per model, one row per bucket, mean loss (ppl)."""
    if not results:
        return ""
    names = [r["model"]["name"] for r in results]
    width = max(16, *(len(n) + 2 for n in names))
    lines = ["positions".ljust(16) + "".join(n.rjust(width) for n in names)]
    for k, row in enumerate(results[0]["buckets"]):
        cells = []
        for r in results:
            b = r["buckets"][k] if k < len(r["buckets"]) else {"mean_loss": None}
            cells.append("-" if b["mean_loss"] is None else f"{b['mean_loss']:.4f} ({b['ppl']:.2f})")
        lines.append(f"{row['start']}-{row['end']}".ljust(16) + "".join(c.rjust(width) for c in cells))
    lines.append("all".ljust(16) + "".join(
        ("-" if r["mean_loss"] is None else f"{r['mean_loss']:.4f} ({r['ppl']:.2f})").rjust(width) for r in results))
    lines.append(f"{results[0]['tokens']:,} predicted tokens in {results[0]['data']['selected']} sample(s) of "
                 f"{results[0]['length']} tokens from {results[0]['data']['prefix']}; loss in nats (perplexity)")
    return "\n".join(lines)
