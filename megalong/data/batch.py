"""A micro-batch on its way to the loss (DESIGN §3): tokens, labels, weights, documents, positions.

This is the one place where labels are shifted, cross-document labels are zeroed and LongAlign's
per-sequence weights are computed, so every loader, test and tool agrees on the loss's inputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch

LossMode = Literal["token", "sequence"]
PositionMode = Literal["continuous", "reset"]


@dataclass
class PackedSample:
    """One training sample as stored by packing: tokens, 0/1 target mask, document lengths."""

    tokens: np.ndarray  # int [S]
    target_mask: np.ndarray  # float/uint8 [S]: 1 where token j is a prediction target
    doc_lengths: np.ndarray  # int [n], sums to S


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # int64 [b, S]
    labels: torch.Tensor  # int64 [b, S]
    loss_weights: torch.Tensor  # float32 [b, S]
    position_ids: torch.Tensor  # int64 [b, S]
    cu_seqlens: torch.Tensor  # int32 [n_docs_total + 1] over the flattened b*S tokens
    max_seqlen: int

    @property
    def seq_length(self) -> int:
        return self.tokens.shape[1]

    def to(self, device) -> "MicroBatch":
        return MicroBatch(self.tokens.to(device), self.labels.to(device), self.loss_weights.to(device),
                          self.position_ids.to(device), self.cu_seqlens.to(device), self.max_seqlen)


def labels_and_weights(tokens: np.ndarray, target_mask: np.ndarray, doc_lengths: np.ndarray,
                       loss_mode: LossMode = "token") -> tuple[np.ndarray, np.ndarray]:
    """labels[t] = x[t+1]; w[t] = mask[t+1], 0 where t+1 opens a document and at the last token."""
    S = len(tokens)
    labels = np.zeros(S, dtype=np.int64)
    labels[:-1] = tokens[1:]
    w = np.zeros(S, dtype=np.float64)
    w[:-1] = np.asarray(target_mask[1:], dtype=np.float64)
    starts = np.cumsum(doc_lengths)[:-1]  # first token of every document but the first
    w[starts - 1] = 0.0
    if loss_mode == "sequence":
        bounds = np.concatenate([[0], np.cumsum(doc_lengths)])
        for a, b in zip(bounds[:-1], bounds[1:]):
            n = w[a:b].sum()
            if n > 0:
                w[a:b] /= n
    elif loss_mode != "token":
        raise ValueError(f"loss_mode must be 'token' or 'sequence', got {loss_mode!r}")
    return labels, w.astype(np.float32)


def position_ids_for(doc_lengths: np.ndarray, S: int, mode: PositionMode) -> np.ndarray:
    if mode == "continuous":
        return np.arange(S, dtype=np.int64)
    if mode == "reset":
        return np.concatenate([np.arange(n, dtype=np.int64) for n in doc_lengths])
    raise ValueError(f"position_ids must be 'continuous' or 'reset', got {mode!r}")


def check_cu_seqlens(cu: Sequence[int], total: int, what: str = "cu_seqlens") -> None:
    cu = np.asarray(cu)
    if cu.ndim != 1 or len(cu) < 2:
        raise ValueError(f"{what} must be 1-D with at least 2 entries, got shape {cu.shape}")
    if cu[0] != 0:
        raise ValueError(f"{what} must start at 0, got {cu[0]} (first entries {cu[:4].tolist()}); "
                         "prepend 0 to the cumulative document lengths")
    if np.any(np.diff(cu) <= 0):
        i = int(np.argmax(np.diff(cu) <= 0))
        raise ValueError(f"{what} must be strictly increasing: entry {i + 1} is {cu[i + 1]} after {cu[i]}; "
                         "drop empty documents")
    if cu[-1] != total:
        raise ValueError(f"{what} must end at the sequence length {total}, got {cu[-1]}; "
                         "document lengths must sum to the sequence length (pad with a final segment)")


def make_micro_batch(samples: Sequence[PackedSample], loss_mode: LossMode = "token",
                     position_mode: PositionMode = "continuous") -> MicroBatch:
    """Stacks samples of one length into a MicroBatch (documents flattened sample-major)."""
    if not samples:
        raise ValueError("make_micro_batch needs at least one sample")
    S = len(samples[0].tokens)
    toks, labs, ws, pos, cus = [], [], [], [], [np.zeros(1, dtype=np.int64)]
    max_len = 0
    for i, s in enumerate(samples):
        if len(s.tokens) != S:
            raise ValueError(f"sample {i} has {len(s.tokens)} tokens, sample 0 has {S}: "
                             "a micro-batch needs equal lengths (pack to one seq_length)")
        lengths = np.asarray(s.doc_lengths, dtype=np.int64)
        check_cu_seqlens(np.concatenate([[0], np.cumsum(lengths)]), S, f"sample {i} cu_seqlens")
        labels, w = labels_and_weights(np.asarray(s.tokens), np.asarray(s.target_mask), lengths, loss_mode)
        toks.append(np.asarray(s.tokens, dtype=np.int64))
        labs.append(labels)
        ws.append(w)
        pos.append(position_ids_for(lengths, S, position_mode))
        cus.append(i * S + np.cumsum(lengths))
        max_len = max(max_len, int(lengths.max()))
    return MicroBatch(
        tokens=torch.from_numpy(np.stack(toks)),
        labels=torch.from_numpy(np.stack(labs)),
        loss_weights=torch.from_numpy(np.stack(ws)),
        position_ids=torch.from_numpy(np.stack(pos)),
        cu_seqlens=torch.from_numpy(np.concatenate(cus).astype(np.int32)),
        max_seqlen=max_len,
    )
