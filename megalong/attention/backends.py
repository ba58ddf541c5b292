"""Registers every attention backend megalong knows (imports of optional packages stay lazy).

"auto" order on CUDA, fastest measured first (DESIGN §5): te > cudnn > flash_attn > flex > varlen >
reference. On CPU only `reference` and `flex` run, and `reference` stays the CPU default: flex's
CPU path is forward-only (torch has no CPU backward for it) and slower at test sizes. Every backend
module imports its optional package inside `available()` / the call, never at import time.
"""
from __future__ import annotations

import importlib

import torch

from megalong.attention.registry import Backend, register_backend


def _load_reference():
    from megalong.attention.reference import reference_attention
    return reference_attention


register_backend(Backend(
    name="reference", loader=_load_reference, available=lambda device: True, priority=0,
    supports_cpu=True, note="exact per-document SDPA; slow, for CPU and checks"))


# The registry orders "auto" by one priority for every device; a per-device order needs its
# `cpu_priority` field. Until that field exists, flex is offered on CUDA only, so that "auto" on
# CPU keeps giving `reference`.
_PER_DEVICE_PRIORITY = "cpu_priority" in getattr(Backend, "__dataclass_fields__", {})


def _lazy(module: str, function: str):
    def load():
        return getattr(importlib.import_module(f"megalong.attention.{module}"), function)
    return load


def _availability(module: str, cpu_ok: bool = False):
    def available(device: torch.device) -> bool:
        if device.type == "cpu" and not cpu_ok:
            return False
        return importlib.import_module(f"megalong.attention.{module}").available(device)
    return available


def _register(name: str, module: str, function: str, priority: int, note: str,
              cpu_ok: bool = False, cpu_priority=None) -> None:
    extra = {"cpu_priority": cpu_priority} if _PER_DEVICE_PRIORITY and cpu_priority is not None else {}
    register_backend(Backend(name=name, loader=_lazy(module, function),
                             available=_availability(module, cpu_ok), priority=priority,
                             supports_cpu=cpu_ok, note=note, **extra))


_register("te", "te", "te_attention", 50,
          "Transformer Engine DotProductAttention (thd, padding_causal_bottom_right); needs "
          "transformer_engine and CUDA")
_register("cudnn", "cudnn", "cudnn_attention", 40,
          "cuDNN SDPA on ragged THD tensors; needs nvidia-cudnn-frontend, cuDNN >= 9 and a "
          "Hopper-or-newer GPU")
_register("flash_attn", "flash", "flash_attention", 30,
          "flash_attn_varlen_func(causal=True); needs flash-attn >= 2.1 and CUDA")
_register("flex", "flex", "flex_attention_thd", 20,
          "torch flex_attention with a document BlockMask; compiled on CUDA, forward-only on CPU",
          cpu_ok=_PER_DEVICE_PRIORITY, cpu_priority=-1)
_register("varlen", "varlen", "varlen_attention", 10,
          "torch.nn.attention.varlen.varlen_attn (FlashAttention-2 inside torch); CUDA only")
