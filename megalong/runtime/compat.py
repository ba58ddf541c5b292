"""Every megatron-core version difference megalong cares about lives here (0.16–0.19)."""
from __future__ import annotations

import inspect
from functools import lru_cache

from megatron.core import package_info

MCORE_VERSION = package_info.__version__
MCORE_VERSION_TUPLE = tuple(int(x) for x in MCORE_VERSION.split(".")[:2])
SUPPORTED = ((0, 16), (0, 19))

if not (SUPPORTED[0] <= MCORE_VERSION_TUPLE <= SUPPORTED[1]):  # pragma: no cover - import-time guard
    import warnings

    warnings.warn(f"megatron-core {MCORE_VERSION} is outside megalong's tested range 0.16–0.19")


@lru_cache(None)
def _params(fn) -> frozenset:
    return frozenset(inspect.signature(fn).parameters)


def call_with_supported(fn, *args, **kwargs):
    """Calls `fn` dropping keyword arguments this megatron-core version does not know."""
    names = _params(fn)
    if any(p.kind == p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values()):
        return fn(*args, **kwargs)
    return fn(*args, **{k: v for k, v in kwargs.items() if k in names})


def dataclass_supported(cls, **kwargs):
    """Builds a megatron config dataclass keeping only the fields this version has."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in kwargs.items() if k in names})


def finalize_grads_without_token_scaling():
    """megatron's finalize_model_grads, minus its int token-count scaling: megalong's loss is already
    normalised by the float global weight sum (DESIGN §4), so gradients must only be summed."""
    from megatron.core.distributed import finalize_model_grads

    def finalize(model, num_tokens=None, *args, **kwargs):
        return finalize_model_grads(model, None, *args, **kwargs)

    return finalize
