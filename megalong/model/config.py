"""Llama-3-family model configs and their translation into megatron-core's TransformerConfig."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F


@dataclass
class RopeScaling:
    """Llama-3.1-style frequency scaling (HF `rope_scaling` with rope_type "llama3")."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class ModelConfig:
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_kv_heads: int = 2
    ffn_hidden_size: int = 128
    vocab_size: int = 256  # the tokenizer's; the model pads it (see padded_vocab_size)
    head_dim: Optional[int] = None  # default hidden_size // num_attention_heads
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    rope_base: float = 500000.0
    rope_scaling: Optional[RopeScaling] = None
    max_position_embeddings: int = 8192
    init_std: float = 0.02
    # Embedding/output rows are padded to a multiple of this (TP-independent, so checkpoints reshard);
    # the padded logits are masked out of the softmax, so padding never changes the loss.
    make_vocab_size_divisible_by: int = 128
    # attention kernel: auto | reference | flex | varlen | cudnn | flash_attn | te
    attention_backend: str = "auto"
    # tokens per chunk of the chunked cross-entropy (never materialises [S, vocab] logits at once)
    loss_chunk_tokens: int = 2048
    params_dtype: Literal["float32", "bfloat16"] = "float32"
    recompute: Literal["none", "selective", "full"] = "none"
    name: str = "custom"

    @property
    def padded_vocab_size(self) -> int:
        m = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // m) * m

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def validate(self, tp: int = 1, cp: int = 1, pp: int = 1) -> None:
        """Checks shapes and parallel divisibility; raises ValueError naming values and the fix."""
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(f"model.num_attention_heads={self.num_attention_heads} must be divisible by "
                             f"model.num_kv_heads={self.num_kv_heads} (GQA groups)")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"model.hidden_size={self.hidden_size} is not divisible by "
                             f"model.num_attention_heads={self.num_attention_heads}; set model.head_dim")
        if self.num_attention_heads % tp:
            raise ValueError(f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                             f"tensor parallel size {tp}; choose parallel.tensor_parallel dividing it")
        if self.num_kv_heads % tp:
            raise ValueError(f"model.num_kv_heads={self.num_kv_heads} is not divisible by tensor parallel "
                             f"size {tp}; choose parallel.tensor_parallel dividing the KV heads")
        if self.padded_vocab_size % tp:
            raise ValueError(f"padded vocabulary {self.padded_vocab_size} is not divisible by tensor parallel "
                             f"size {tp}; set model.make_vocab_size_divisible_by to a multiple of {tp}")
        if self.ffn_hidden_size % tp:
            raise ValueError(f"model.ffn_hidden_size={self.ffn_hidden_size} is not divisible by tensor "
                             f"parallel size {tp}")
        if self.num_layers % pp:
            raise ValueError(f"model.num_layers={self.num_layers} is not divisible by pipeline parallel "
                             f"size {pp}; choose parallel.pipeline_parallel dividing it")
        if self.recompute not in ("none", "selective", "full"):
            raise ValueError(f"model.recompute={self.recompute!r}: use none, selective or full")


def _preset(**kw) -> ModelConfig:
    return ModelConfig(**kw)


PRESETS: dict[str, ModelConfig] = {
    # Llama-3-8B(-Instruct): the model ProLong continues pretraining from.
    "llama3_8b": _preset(name="llama3_8b", num_layers=32, hidden_size=4096, num_attention_heads=32,
                         num_kv_heads=8, ffn_hidden_size=14336, vocab_size=128256, rope_base=500000.0,
                         params_dtype="bfloat16"),
    "llama3_2_1b": _preset(name="llama3_2_1b", num_layers=16, hidden_size=2048, num_attention_heads=32,
                           num_kv_heads=8, ffn_hidden_size=8192, vocab_size=128256, head_dim=64,
                           tie_embeddings=True, rope_base=500000.0, params_dtype="bfloat16",
                           rope_scaling=RopeScaling(factor=32.0)),
    "llama3_2_3b": _preset(name="llama3_2_3b", num_layers=28, hidden_size=3072, num_attention_heads=24,
                           num_kv_heads=8, ffn_hidden_size=8192, vocab_size=128256, head_dim=128,
                           tie_embeddings=True, rope_base=500000.0, params_dtype="bfloat16",
                           rope_scaling=RopeScaling(factor=32.0)),
    # Tiny sizes for tests and the CPU demo.
    "tiny": _preset(name="tiny", num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=2,
                    ffn_hidden_size=128, vocab_size=256),
    "small": _preset(name="small", num_layers=4, hidden_size=128, num_attention_heads=8, num_kv_heads=4,
                     ffn_hidden_size=384, vocab_size=4096),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def transformer_config(cfg: ModelConfig, tp: int = 1, pp: int = 1, cp: int = 1, use_cpu_init: bool = True,
                       initialize: bool = True):
    """The megatron-core TransformerConfig for a ModelConfig (Llama: RMSNorm, SwiGLU, no biases).
    initialize=False leaves weights uninitialised, for callers that overwrite every parameter."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megalong.runtime.compat import dataclass_supported

    dtype = torch.bfloat16 if cfg.params_dtype == "bfloat16" else torch.float32
    recompute = {} if cfg.recompute == "none" else (
        {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
        if cfg.recompute == "full" else {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]})
    return dataclass_supported(
        TransformerConfig,
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_kv_heads, ffn_hidden_size=cfg.ffn_hidden_size, kv_channels=cfg.kv_channels,
        normalization="RMSNorm", layernorm_epsilon=cfg.norm_eps, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=False,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=cfg.init_std,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp,
        sequence_parallel=False, use_cpu_initialization=use_cpu_init, perform_initialization=initialize,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
        calculate_per_token_loss=True, cross_entropy_loss_fusion=False,
        **recompute,
    )
