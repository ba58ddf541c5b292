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


def prepare_optimizer_for_load(optimizer) -> None:
    """Gives a fresh optimizer the state entries its sharded_state_dict() expects when loading.

    Without apex/TE, megatron's DistributedOptimizer.state_dict() reads a 'step' from every param
    state, which a never-stepped torch Adam lacks (megatron's init_state_fn creates only the moments).
    """
    import torch

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if len(st) == 0:
                    st["exp_avg"] = torch.zeros_like(p.data)
                    st["exp_avg_sq"] = torch.zeros_like(p.data)
                st.setdefault("step", torch.zeros([], dtype=torch.float32))
        _keep_step_when_loading(opt)


def unshare_adam_steps(optimizer) -> None:
    """After loading: megatron-core without Apex/TE loads the distributed optimizer's Adam 'step' as ONE
    tensor shared by every parameter's state; torch Adam increments it in place once per parameter, so
    each parameter got a different bias correction. Give every state its own copy (bit-exact resume)."""
    import torch

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for st in (inner.state.values() if inner is not None else ()):
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].clone()


def _keep_step_when_loading(opt) -> None:
    """megatron-core 0.16 without apex/TE: loading a fully_reshardable distributed-optimizer state
    copies every per-param state key from the checkpoint, 'step' included, which the checkpoint keeps
    elsewhere (KeyError: 'step'). Keep the step that load_state_dict has already restored."""
    setter = getattr(type(opt), "_set_main_param_and_optimizer_states", None)
    if setter is None or getattr(opt, "_megalong_step_patch", False):
        return

    def set_states(model_param, tensors):
        group_index, group_order = opt.model_param_group_index_map[model_param]
        main = opt.optimizer.param_groups[group_index]["params"][group_order]
        st = opt.optimizer.state.get(main, {})
        if "step" in st and "step" not in tensors:
            tensors = dict(tensors, step=st["step"].clone())
        return setter(opt, model_param, tensors)

    opt._set_main_param_and_optimizer_states = set_states
    opt._megalong_step_patch = True
