"""Process groups: torch.distributed (NCCL on GPUs, gloo on CPU) + megatron-core's parallel state."""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    context_parallel: int = 1
    # "allgather": K/V all-gathered over the CP group (document-mask friendly, Llama 3's choice).
    cp_comm: str = "allgather"
    distributed_optimizer: bool = True
    timeout_minutes: int = 30


@dataclass
class ParallelState:
    rank: int
    world_size: int
    tp: int
    pp: int
    cp: int
    dp: int
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int
    device: torch.device

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def _env_int(*names: str, default: int) -> int:
    for n in names:
        if os.environ.get(n):
            return int(os.environ[n])
    return default


def env_rank() -> int:
    """This process's global rank as torchrun (RANK) or srun (SLURM_PROCID) gives it; 0 when alone."""
    return _env_int("RANK", "SLURM_PROCID", default=0)


def env_world_size() -> int:
    """The number of processes as torchrun (WORLD_SIZE) or srun (SLURM_NTASKS) gives it; 1 when alone."""
    return _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a local rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: ParallelConfig, seed: int = 1234) -> ParallelState:
    """Initialises torch.distributed from torchrun/srun variables and megatron's model-parallel groups."""
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel

    from megalong.runtime import cpu_shim

    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        cpu_shim.apply()
    rank, world = env_rank(), env_world_size()
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    if world == 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        # a lone process (eval, conversion, a one-process run) rendezvouses with nobody: a fresh local
        # port, never an inherited MASTER_PORT that a concurrent run may hold
        init_method = f"tcp://127.0.0.1:{free_port()}"
    else:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        init_method = "env://"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method=init_method, rank=rank,
                                world_size=world, timeout=datetime.timedelta(minutes=cfg.timeout_minutes))
    model_parallel = cfg.tensor_parallel * cfg.pipeline_parallel * cfg.context_parallel
    if world % model_parallel:
        raise ValueError(f"world size {world} is not divisible by TP×PP×CP = {cfg.tensor_parallel}×"
                         f"{cfg.pipeline_parallel}×{cfg.context_parallel} = {model_parallel}; "
                         "change parallel.* or the number of processes")
    if not mpu.model_parallel_is_initialized():
        mpu.initialize_model_parallel(
            tensor_model_parallel_size=cfg.tensor_parallel,
            pipeline_model_parallel_size=cfg.pipeline_parallel,
            context_parallel_size=cfg.context_parallel,
        )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return current_parallel_state()


def current_parallel_state() -> ParallelState:
    from megatron.core import parallel_state as mpu

    return ParallelState(
        rank=dist.get_rank(), world_size=dist.get_world_size(),
        tp=mpu.get_tensor_model_parallel_world_size(), pp=mpu.get_pipeline_model_parallel_world_size(),
        cp=mpu.get_context_parallel_world_size(), dp=mpu.get_data_parallel_world_size(),
        tp_rank=mpu.get_tensor_model_parallel_rank(), pp_rank=mpu.get_pipeline_model_parallel_rank(),
        cp_rank=mpu.get_context_parallel_rank(), dp_rank=mpu.get_data_parallel_rank(),
        device=torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
        else torch.device("cpu"),
    )


def destroy_distributed() -> None:
    from megatron.core import parallel_state as mpu

    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
