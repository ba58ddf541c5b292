"""The one CPU shim: makes megatron-core (model, schedules, DDP, optimizer, dist_checkpointing) run
on CPU with gloo, for development and tests (DESIGN §6).

megatron-core assumes CUDA in a handful of places: tensors created with `device="cuda"` or
`torch.cuda.current_device()`, the CUDA RNG tracker, streams and synchronisation, and asserts on
`torch.cuda.FloatTensor` type names. Rather than fork those files, `apply()` installs:
- a TorchFunctionMode that maps CUDA device arguments (and `Tensor.cuda()`) to the CPU,
- CPU stand-ins for the CUDA RNG / stream / sync functions megatron calls,
- a `Tensor.type()` answer in CUDA spelling for megatron's type-name asserts.
It is applied only when CUDA is absent, and `check()` fails loudly if a megatron-core version
changes one of the functions it relies on.
"""
from __future__ import annotations

import contextlib
import threading

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False
_LOCK = threading.Lock()


def _is_cuda_device(device) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True  # a bare index means a CUDA device to torch
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU for every torch call made under it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if func in (torch.Tensor.to,) and args and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


class _DummyStream:
    def __init__(self, *a, **k):
        pass

    def wait_stream(self, *a, **k):
        pass

    def wait_event(self, *a, **k):
        pass

    def record_event(self, *a, **k):
        return _DummyEvent()

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


class _DummyEvent:
    def __init__(self, *a, **k):
        pass

    def record(self, *a, **k):
        pass

    def wait(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.synchronize = lambda *a, **k: None
    cuda.current_stream = lambda *a, **k: _DummyStream()
    cuda.default_stream = lambda *a, **k: _DummyStream()
    cuda.Stream = _DummyStream
    cuda.Event = _DummyEvent
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # torch.manual_seed itself calls cuda.manual_seed_all: seed the CPU generator directly.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    cuda.set_device = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    cuda.device_count = lambda: 0


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as tp_random

    tp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def prepare_checkpoint_writer() -> None:
    """CPU only, called before the first save: megatron-core collects its checkpoint writers' results
    through a multiprocessing Manager started with 'spawn' (to keep CUDA out of it); that fresh
    interpreter imports torch to unpickle the first result, ~4 s of a 2-core machine per process.
    Without CUDA there is nothing to keep out, so the Manager is forked (megatron forks its writer
    processes the same way). An optimisation only: skipped if a release renames the function."""
    import multiprocessing as mp

    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa
    except ImportError:
        return
    if not _APPLIED or not hasattr(fsa, "_get_write_results_queue") or getattr(fsa, "_megalong_forked", False):
        return

    def forked_results_queue():
        if fsa._results_queue is None:
            fsa._results_queue = mp.get_context("fork").Manager().Queue()
        return fsa._results_queue

    fsa._get_write_results_queue = forked_results_queue
    fsa._megalong_forked = True


# The megatron-core functions this shim replaces or relies on; check() verifies they still exist.
_REQUIRED = [
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state"),
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state"),
    ("megatron.core.tensor_parallel.random", "get_cuda_rng_tracker"),
    ("megatron.core.pipeline_parallel", "get_forward_backward_func"),
    ("megatron.core.distributed", "DistributedDataParallel"),
    ("megatron.core.optimizer", "get_megatron_optimizer"),
]


def check() -> None:
    """Raises if a megatron-core release moved something this shim patches (tested in CI)."""
    import importlib

    missing = []
    for mod, name in _REQUIRED:
        try:
            if not hasattr(importlib.import_module(mod), name):
                missing.append(f"{mod}.{name}")
        except ImportError:
            missing.append(mod)
    if missing:
        from megalong.runtime.compat import MCORE_VERSION
        raise RuntimeError(f"megatron-core {MCORE_VERSION} changed what megalong's CPU shim patches: "
                           f"{', '.join(missing)} — update megalong/runtime/cpu_shim.py")


def apply(force: bool = False) -> bool:
    """Installs the shim once per process when CUDA is absent; returns whether it is active."""
    global _APPLIED
    if torch.cuda.is_available() and not force:
        return False
    with _LOCK:
        if _APPLIED:
            return True
        check()
        _patch_torch_cuda()
        _patch_megatron_rng()
        mode = _CudaToCpuMode()
        mode.__enter__()  # process-wide for the main thread: megatron's calls all happen there
        _APPLIED = True
    return True


def is_active() -> bool:
    return _APPLIED
