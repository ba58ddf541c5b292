"""megalong's core_attention for megatron-core layer specs: RoPE from explicit positions, context
parallelism, and a document-masked kernel from the registry.

Megatron's SelfAttention computes Q/K/V and calls `core_attention(q, k, v, mask, ...,
packed_seq_params=...)`. We pass a `DocumentParams` (a PackedSeqParams with qkv_format "sbhd", so
megatron neither squeezes the batch nor applies its own RoPE) that carries the documents and
positions of this micro-batch; GPTModel is built with position_embedding_type="none".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule

from megalong.attention.context_parallel import attention_layout, gather_sequence, local_token_index
from megalong.attention.registry import get_attention_fn, resolve_backend
from megalong.data.batch import MicroBatch
from megalong.model.rope import RotaryEmbedding, apply_rope


@dataclass
class DocumentParams(PackedSeqParams):
    """Documents and positions of one micro-batch as seen by this rank (after CP sharding)."""

    position_ids: Optional[torch.Tensor] = None  # [b, s_local]
    cu_seqlens_full: Optional[torch.Tensor] = None  # [n+1] over the flattened b*S tokens
    k_index: Optional[torch.Tensor] = None  # CP: keys each local query range needs
    batch: int = 1
    seq_len: int = 0  # full (unsharded) sample length S
    cp_size: int = 1
    cp_rank: int = 0
    cache: dict = field(default_factory=dict)

    @classmethod
    def for_micro_batch(cls, mb: MicroBatch, cp_rank: int = 0, cp_size: int = 1, cp_group=None,
                        device=None) -> "DocumentParams":
        b, S = mb.tokens.shape
        device = device or mb.tokens.device
        cu = mb.cu_seqlens.cpu().numpy()
        cu_q, cu_k, max_q, max_k, k_index = attention_layout(cu, b, S, cp_rank, cp_size)
        local = local_token_index(S, cp_rank, cp_size)
        return cls(
            qkv_format="sbhd",
            cu_seqlens_q=torch.as_tensor(cu_q, dtype=torch.int32, device=device),
            cu_seqlens_kv=torch.as_tensor(cu_k, dtype=torch.int32, device=device),
            max_seqlen_q=max_q, max_seqlen_kv=max_k, cp_group=cp_group,
            position_ids=mb.position_ids[:, torch.as_tensor(local)].to(device),
            cu_seqlens_full=mb.cu_seqlens.to(device),
            k_index=None if k_index is None else torch.as_tensor(k_index, device=device),
            batch=b, seq_len=S, cp_size=cp_size, cp_rank=cp_rank,
        )


def shard_for_context_parallel(mb: MicroBatch, cp_rank: int, cp_size: int) -> MicroBatch:
    """This rank's tokens, labels, weights and positions (cu_seqlens stay global)."""
    if cp_size == 1:
        return mb
    idx = torch.as_tensor(local_token_index(mb.seq_length, cp_rank, cp_size))
    return MicroBatch(mb.tokens[:, idx], mb.labels[:, idx], mb.loss_weights[:, idx], mb.position_ids[:, idx],
                      mb.cu_seqlens, mb.max_seqlen)


class DocumentAttention(MegatronModule):
    """Drop-in `core_attention` submodule (same constructor as megatron's DotProductAttention)."""

    def __init__(self, config, layer_number: int, attn_mask_type=None, attention_type: str = "self",
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection: Any = None, **_unused):
        super().__init__(config=config)
        ext = getattr(config, "megalong", None)
        if ext is None:
            raise ValueError("DocumentAttention needs config.megalong (build the model with megalong.model)")
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale or self.head_dim ** -0.5
        self.backend = ext.attention_backend
        self.rotary = RotaryEmbedding(self.head_dim, ext.rope_base, ext.rope_scaling)
        self._fn = None

    def _attention_fn(self, device):
        if self._fn is None:
            self._fn = get_attention_fn(resolve_backend(self.backend, device))
        return self._fn

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params: Optional[DocumentParams] = None, **_unused):
        p = packed_seq_params
        if not isinstance(p, DocumentParams):
            raise ValueError("DocumentAttention needs packed_seq_params=DocumentParams.for_micro_batch(...): "
                             "megalong never attends across documents without knowing them")
        s, b, hq, d = query.shape
        key_cache = ("cos_sin", query.dtype)
        if key_cache not in p.cache:
            p.cache[key_cache] = self.rotary.cos_sin(p.position_ids, query.dtype)
        cos, sin = p.cache[key_cache]
        query, key = apply_rope(query, cos, sin), apply_rope(key, cos, sin)
        if p.cp_size > 1:
            key, value = gather_sequence(key, p.cp_group), gather_sequence(value, p.cp_group)
        q = query.transpose(0, 1).reshape(b * s, hq, d)
        k = key.transpose(0, 1).reshape(-1, key.shape[2], d)
        v = value.transpose(0, 1).reshape(-1, value.shape[2], d)
        if p.k_index is not None:
            k, v = k.index_select(0, p.k_index), v.index_select(0, p.k_index)
        out = self._attention_fn(q.device)(q.contiguous(), k.contiguous(), v.contiguous(), p.cu_seqlens_q,
                                           p.cu_seqlens_kv, p.max_seqlen_q, p.max_seqlen_kv, self.softmax_scale)
        return out.reshape(b, s, hq * d).transpose(0, 1).contiguous()
