"""One attention interface, many kernels (DESIGN §5).

Every backend is a function

    fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale) -> out

on THD tensors (q [Tq, Hq, D], k/v [Tk, Hkv, D]) that is causal and bottom-right aligned per
segment (see docs/architecture.md). Backends register with an availability check so that a missing
optional package (TE, flash-attn, cuDNN frontend) never breaks import; `resolve_backend("auto")`
picks the fastest one available on the device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

AttentionFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Backend:
    name: str
    loader: Callable[[], AttentionFn]  # imports lazily: optional packages load only when chosen
    available: Callable[[torch.device], bool]
    priority: int  # higher wins for "auto"
    supports_cpu: bool = False
    note: str = ""
    cpu_priority: Optional[int] = None  # "auto" ranking on CPU, where fast GPU kernels may be slow

    def priority_on(self, device: torch.device) -> int:
        if device.type == "cpu" and self.cpu_priority is not None:
            return self.cpu_priority
        return self.priority


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend


def backend_names() -> list[str]:
    _ensure_registered()
    return sorted(_BACKENDS)


def available_backends(device: torch.device | str) -> list[str]:
    _ensure_registered()
    device = torch.device(device)
    out = []
    for b in sorted(_BACKENDS.values(), key=lambda b: -b.priority_on(device)):
        try:
            ok = b.available(device)
        except Exception:  # an optional dependency that is broken counts as absent
            ok = False
        if ok:
            out.append(b.name)
    return out


def resolve_backend(name: str, device: torch.device | str) -> str:
    """Maps "auto" to the best available backend; validates explicit names with a clear error."""
    _ensure_registered()
    device = torch.device(device)
    avail = available_backends(device)
    if name == "auto":
        if not avail:
            raise RuntimeError(f"no attention backend is available on {device}")
        return avail[0]
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of "
                         f"{', '.join(['auto'] + backend_names())}")
    if name not in avail:
        raise ValueError(f"attention backend {name!r} is not available on {device} "
                         f"({_BACKENDS[name].note or 'missing package or device'}); available: "
                         f"{', '.join(avail) or 'none'} — set model.attention_backend=auto")
    return name


_LOADED: dict[str, AttentionFn] = {}


def get_attention_fn(name: str) -> AttentionFn:
    _ensure_registered()
    if name not in _LOADED:
        _LOADED[name] = _BACKENDS[name].loader()
    return _LOADED[name]


def _ensure_registered() -> None:
    # Importing the backends package registers every backend it knows.
    from megalong.attention import backends  # noqa: F401
