"""Memory-light output layer: per-token cross-entropy computed chunk by chunk.

GPTModel's output layer would materialise [S, b, vocab/TP] logits (and fp32 copies of them) for the
whole sequence — 65 GB at 512K tokens of a 128K vocabulary. `ChunkedCrossEntropyHead` is megatron's
own ColumnParallelLinear (same parameters, same checkpoint keys) whose forward, while targets are
set, returns per-token CE instead of logits: each chunk's logits are computed, reduced with
megatron's vocab-parallel cross-entropy and dropped; backward recomputes them chunk by chunk.
"""
from __future__ import annotations

import contextlib

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import ColumnParallelLinear
from torch.utils.checkpoint import checkpoint


def mask_padded_vocab(logits: torch.Tensor, true_vocab: int | None, tp_rank: int) -> torch.Tensor:
    """Sets the logits of padding rows (ids ≥ the tokenizer's vocabulary) to the dtype's minimum."""
    if true_vocab is None:
        return logits
    local = logits.shape[-1]
    start = tp_rank * local
    if start + local <= true_vocab:
        return logits
    ids = torch.arange(start, start + local, device=logits.device)
    return logits.masked_fill(ids >= true_vocab, torch.finfo(logits.dtype).min)


def _chunk_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         true_vocab: int | None, tp_rank: int):
    logits = mask_padded_vocab(torch.matmul(hidden, weight.t()).float(), true_vocab, tp_rank)
    return tensor_parallel.vocab_parallel_cross_entropy(logits, labels)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk_tokens: int, true_vocab: int | None = None, tp_rank: int = 0) -> torch.Tensor:
    """Per-token CE [s, b] of logits = hidden @ weight.T (vocab-parallel under TP), chunked over s."""
    s, b = hidden.shape[0], hidden.shape[1]
    step = max(1, chunk_tokens // max(b, 1))
    if step >= s:
        return _chunk_cross_entropy(hidden, weight, labels, true_vocab, tp_rank)
    pieces = []
    for i in range(0, s, step):
        pieces.append(checkpoint(_chunk_cross_entropy, hidden[i:i + step], weight, labels[i:i + step], true_vocab,
                                 tp_rank, use_reentrant=False))
    return torch.cat(pieces, dim=0)


class ChunkedCrossEntropyHead(ColumnParallelLinear):
    """Swapped in for GPTModel.output_layer (class swap: parameters and keys stay megatron's)."""

    _targets = None
    chunk_tokens = 2048
    true_vocab_size: int | None = None

    @contextlib.contextmanager
    def targets(self, labels: torch.Tensor):
        """While active, forward returns per-token CE [s, b, 1] for labels [b, s] instead of logits."""
        self._targets = labels
        try:
            yield
        finally:
            self._targets = None

    def forward(self, input_, weight=None, runtime_gather_output=None):
        from megatron.core import parallel_state as mpu

        tp_rank = mpu.get_tensor_model_parallel_rank()
        if self._targets is None:
            logits, bias = super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)
            gathered = logits.shape[-1] == self.output_size_per_partition * mpu.get_tensor_model_parallel_world_size()
            return mask_padded_vocab(logits, self.true_vocab_size, 0 if gathered else tp_rank), bias
        w = self.weight if weight is None else weight
        hidden = tensor_parallel.copy_to_tensor_model_parallel_region(input_)
        labels = self._targets.transpose(0, 1).contiguous()
        ce = chunked_cross_entropy(hidden, w, labels, self.chunk_tokens, self.true_vocab_size, tp_rank)
        return ce.unsqueeze(-1), None
