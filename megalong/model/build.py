"""Builds a Llama-3-family megatron-core GPTModel with megalong's attention and loss head."""
from __future__ import annotations

import copy

import torch

from megalong.model.config import ModelConfig, transformer_config
from megalong.model.head import ChunkedCrossEntropyHead


def layer_spec(cfg: ModelConfig):
    """megatron's local GPT layer spec (RMSNorm, SwiGLU) with DocumentAttention as core_attention."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megalong.attention.module import DocumentAttention

    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
    spec.submodules.self_attention.submodules.core_attention = DocumentAttention
    return spec


def build_model(cfg: ModelConfig, tp: int = 1, pp: int = 1, cp: int = 1, pre_process: bool | None = None,
                post_process: bool | None = None, use_cpu_init: bool = True, initialize: bool = True):
    """One pipeline stage of the model for the current megatron parallel state. initialize=False skips
    the random init (and its full-size fp32 temporaries) when every weight is loaded next."""
    from megatron.core import parallel_state as mpu
    from megatron.core.models.gpt import GPTModel

    cfg.validate(tp=tp, cp=cp, pp=pp)
    tcfg = transformer_config(cfg, tp=tp, pp=pp, cp=cp, use_cpu_init=use_cpu_init, initialize=initialize)
    tcfg.megalong = cfg  # read by DocumentAttention (RoPE base/scaling, backend)
    if pre_process is None:
        pre_process = mpu.is_pipeline_first_stage()
    if post_process is None:
        post_process = mpu.is_pipeline_last_stage()
    model = GPTModel(
        config=tcfg, transformer_layer_spec=layer_spec(cfg), vocab_size=cfg.padded_vocab_size,
        max_sequence_length=cfg.max_position_embeddings, pre_process=pre_process, post_process=post_process,
        parallel_output=True, share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type="none",
    )
    if post_process:
        model.output_layer.__class__ = ChunkedCrossEntropyHead
        model.output_layer.chunk_tokens = cfg.loss_chunk_tokens
        model.output_layer.true_vocab_size = cfg.vocab_size
    if not torch.cuda.is_available():
        model = model.cpu()
    return model


def output_head(model) -> ChunkedCrossEntropyHead | None:
    """The loss head of a (possibly DDP/Float16-wrapped) last-stage model, else None."""
    m = model
    while not hasattr(m, "output_layer") and hasattr(m, "module"):
        m = m.module
    head = getattr(m, "output_layer", None)
    return head if isinstance(head, ChunkedCrossEntropyHead) else None
