"""Model shapes and GPU specs the planner reasons about (no torch: the planner runs anywhere).

A `ModelShape` is only the numbers that set FLOPs and memory; `megalong.model.config.ModelConfig`
(the trainer's model description) converts with `as_shape`, so the trainer's MFU and the planner
count the same thing. GPU figures are vendor datasheet numbers, stated once here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    """A Llama-style decoder: RMSNorm, GQA attention, SwiGLU MLP, no biases."""

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_ffn: int
    vocab: int
    tied_embeddings: bool = False

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.d_head

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.d_head

    @property
    def layer_matmul_params(self) -> int:
        """Weights of one layer's matrix multiplies: Q, K, V, O projections and the 3 SwiGLU matrices."""
        d = self.d_model
        return d * self.q_dim + 2 * d * self.kv_dim + self.q_dim * d + 3 * d * self.d_ffn

    @property
    def layer_norm_params(self) -> int:
        return 2 * self.d_model  # input_layernorm + pre_mlp_layernorm (RMSNorm weights only)

    @property
    def layer_params(self) -> int:
        return self.layer_matmul_params + self.layer_norm_params

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.d_model

    @property
    def output_params(self) -> int:
        """The LM head's own weights (0 when tied to the embedding)."""
        return 0 if self.tied_embeddings else self.vocab * self.d_model

    @property
    def n_params(self) -> int:
        """All parameters, each counted once (a tied embedding is one matrix)."""
        return (self.n_layers * self.layer_params + self.embedding_params + self.output_params
                + self.d_model)  # final norm

    @property
    def matmul_params(self) -> int:
        """N_matmul of DESIGN §9: every weight used in a matmul per token — layers plus the LM head
        (tied or not: the head multiplies either way). The embedding lookup is a gather, not a matmul."""
        return self.n_layers * self.layer_matmul_params + self.vocab * self.d_model


def _shape(name, n_layers, d_model, n_heads, n_kv_heads, d_ffn, vocab=128_256, d_head=None, tied=False):
    return ModelShape(name=name, n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads,
                      d_head=d_head or d_model // n_heads, d_ffn=d_ffn, vocab=vocab, tied_embeddings=tied)


# Shapes from the models' published config.json files (meta-llama on the HF Hub).
MODELS: dict[str, ModelShape] = {
    "llama3_8b": _shape("llama3_8b", 32, 4096, 32, 8, 14336),
    "llama3_2_1b": _shape("llama3_2_1b", 16, 2048, 32, 8, 8192, d_head=64, tied=True),
    "llama3_2_3b": _shape("llama3_2_3b", 28, 3072, 24, 8, 8192, d_head=128, tied=True),
    "llama3_70b": _shape("llama3_70b", 80, 8192, 64, 8, 28672),
    # Same numbers as megalong.model.config's "tiny" and "small" presets (CPU tests and the demo).
    "tiny": _shape("tiny", 2, 64, 4, 2, 128, vocab=256),
    "small": _shape("small", 4, 128, 8, 4, 384, vocab=4096),
}


def get_model(name: str) -> ModelShape:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name]


def as_shape(model: Any) -> ModelShape:
    """A ModelShape from a ModelShape, a model name, or anything shaped like megalong's ModelConfig
    (num_layers, hidden_size, num_attention_heads, num_kv_heads, ffn_hidden_size, vocab_size, ...)."""
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, str):
        return get_model(model)
    try:
        d_head = getattr(model, "head_dim", None) or model.hidden_size // model.num_attention_heads
        return ModelShape(name=getattr(model, "name", "custom"), n_layers=model.num_layers,
                          d_model=model.hidden_size, n_heads=model.num_attention_heads,
                          n_kv_heads=model.num_kv_heads, d_head=d_head, d_ffn=model.ffn_hidden_size,
                          vocab=model.vocab_size, tied_embeddings=bool(getattr(model, "tie_embeddings", False)))
    except AttributeError as e:
        raise TypeError(f"cannot read a model shape from {type(model).__name__}: {e}; pass a ModelShape, "
                        f"a model name ({', '.join(MODELS)}) or a megalong ModelConfig") from None


@dataclass(frozen=True)
class GpuSpec:
    """Datasheet numbers for one accelerator (SXM parts).

    peak_tflops: dense bf16 tensor-core peak (no sparsity). memory_gib: the total nvidia-smi reports.
    nvlink_gbps: NVLink bandwidth per direction per GPU (GB/s). ib_gbps: inter-node bandwidth per GPU
    (GB/s, one NIC per GPU). hbm_tbps: memory bandwidth (TB/s).
    """

    name: str
    peak_tflops: float
    memory_gib: float
    hbm_tbps: float
    nvlink_gbps: float
    ib_gbps: float


GPUS: dict[str, GpuSpec] = {
    # H100 SXM5 80GB: 989 TF/s bf16 dense, 81,559 MiB, HBM3 3.35 TB/s, NVLink4 450 GB/s/dir, NDR 400 Gb/s.
    "h100": GpuSpec("h100", 989.0, 81559 / 1024, 3.35, 450.0, 50.0),
    # H200 SXM 141GB: same compute as H100, 143,771 MiB of HBM3e at 4.8 TB/s.
    "h200": GpuSpec("h200", 989.0, 143771 / 1024, 4.8, 450.0, 50.0),
    # A100 SXM4 80GB: 312 TF/s bf16 dense, 81,920 MiB, 2.04 TB/s, NVLink3 300 GB/s/dir, HDR 200 Gb/s.
    "a100": GpuSpec("a100", 312.0, 80.0, 2.04, 300.0, 25.0),
}


def get_gpu(name: str) -> GpuSpec:
    key = name.lower().replace("-", "").replace("_", "").replace("sxm", "")
    if key not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; choose one of {', '.join(GPUS)}")
    return GPUS[key]
