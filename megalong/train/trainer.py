"""The training loop: build → restore (resume or init_from) → steps with logging, evaluation,
checkpoints and clean stops → summary.

One step = this DP rank's micro-batches of the global batch (`GlobalBatchLoader`, so any DP size or
micro-batch split sees the same samples) through `megalong.step.forward_backward` (exact global-batch
loss, DESIGN §4), a finiteness check all ranks agree on, then megatron-core's optimizer step and the
LR schedule. Everything a bit-exact resume needs (weights, optimizer, schedule, RNG, the count of
consumed samples) is in each checkpoint (`megalong.checkpoint`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from megalong import checkpoint as ckpt
from megalong.config import ConfigError, dump_yaml, to_dict
from megalong.plan.flops import flops_per_token, mfu
from megalong.train.config import RunConfig, RunPlan
from megalong.train.logger import MetricsLogger, default_peak_tflops, peak_memory_gib
from megalong.train.signals import Deadline, StopSignals, agree

EXIT_OK, EXIT_CONFIG, EXIT_NAN = 0, 2, 3
# Shape fields that must match for train.init_from (RoPE, dtype, recompute, ... may change per stage).
SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "ffn_hidden_size",
                "vocab_size", "head_dim", "tie_embeddings")


class SetupError(ValueError):
    """A problem found while building the run (checkpoint, data, layout): reported in one line."""


@dataclass
class Session:
    """Everything a running stage holds."""

    cfg: RunConfig
    plan: RunPlan
    ps: object  # megalong.runtime.distributed.ParallelState
    chunks: list
    optimizer: object
    scheduler: object
    loader: object
    eval_loader: object = None
    logger: MetricsLogger = None
    resolved: dict = field(default_factory=dict)
    step: int = 0
    consumed: int = 0
    tokens_trained: int = 0
    resumed_from: Optional[str] = None
    last_checkpoint: Optional[str] = None
    last_saved_step: int = -1
    last_eval_step: int = -1
    last_eval: Optional[dict] = None
    last_metrics: Optional[dict] = None
    run_tokens: int = 0  # tokens and seconds of this launch's steps (for summary.json)
    run_seconds: float = 0.0

    @property
    def save_dir(self) -> Path:
        return Path(self.cfg.train.save_dir)

    @property
    def is_main(self) -> bool:
        return self.ps.rank == 0


@dataclass
class StepResult:
    loss: float
    weight_sum: float
    grad_norm: Optional[float]
    finite: bool
    lr: float


# ---------------------------------------------------------------------------------------- setup


def build(cfg: RunConfig, plan: RunPlan, ps, loader=None) -> Session:
    """Model, optimizer, schedule and data for an initialised process group (no restore yet)."""
    from megalong.data.loader import GlobalBatchLoader
    from megalong.model.build import build_model
    from megalong.optim import build_optimizer, build_scheduler
    from megalong.step import setup_model_for_training

    seed = cfg.train.seed
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    par = cfg.parallel
    model = build_model(plan.model, tp=par.tensor_parallel, pp=par.pipeline_parallel, cp=par.context_parallel,
                        use_cpu_init=ps.device.type == "cpu")
    chunks = setup_model_for_training([model], use_distributed_optimizer=cfg.optim.distributed_optimizer)
    optimizer = build_optimizer(cfg.optim, chunks, bf16=plan.model.params_dtype == "bfloat16")
    scheduler = build_scheduler(cfg.optim, optimizer, plan.steps)
    if loader is None:
        loader = GlobalBatchLoader(cfg.data)
    eval_loader = None
    if cfg.eval.datasets:
        eval_loader = GlobalBatchLoader(dataclasses.replace(cfg.data, datasets=cfg.eval.datasets,
                                                            sorted_batching=False), where="eval")
    return Session(cfg=cfg, plan=plan, ps=ps, chunks=chunks, optimizer=optimizer, scheduler=scheduler,
                   loader=loader, eval_loader=eval_loader, resolved=to_dict(cfg))


def restore(s: Session) -> None:
    """`train.resume` (everything, bit-exact) or else `train.init_from` (weights only)."""
    tr = s.cfg.train
    source = None
    if tr.resume == "auto":
        source = ckpt.latest_checkpoint(s.save_dir)
    elif tr.resume == "never":
        if ckpt.latest_checkpoint(s.save_dir) is not None:
            s.logger.note(f"train.resume=never: not resuming from the checkpoints in {s.save_dir}; new saves "
                          "at the same steps replace them")
    else:
        source = ckpt.latest_checkpoint(tr.resume)
        if source is None:
            raise SetupError(f"train.resume={tr.resume!r}: no complete checkpoint there; give a checkpoint "
                             "directory (iter_*) or a save_dir with a 'latest' pointer, or use auto/never")
    if source is not None:
        _check_shape(source, s.plan.model, "train.resume")
        saved_stage = (ckpt.read_meta(source).get("run_state") or {}).get("stage")
        if saved_stage not in (None, tr.stage):
            raise SetupError(f"{source} is a checkpoint of stage {saved_stage!r}, this run is stage {tr.stage!r}: "
                             f"to start a new stage from it use train.init_from={source} with another "
                             "train.save_dir")
        try:
            meta = ckpt.load_checkpoint(source, s.chunks, optimizer=s.optimizer, scheduler=s.scheduler,
                                        restore_rng=True)
        except AssertionError as e:  # megatron's scheduler refuses a changed LR schedule
            raise SetupError(f"cannot resume from {source}: {e}; keep optim.* and the stage length of that "
                             "run, or start a new stage with train.init_from") from None
        rs = meta.get("run_state") or {}
        s.step = int(meta["step"])
        s.consumed = s.loader.resume(rs["data"]) if "data" in rs else int(rs.get("consumed_samples", 0))
        s.tokens_trained = int(rs.get("tokens", 0))
        s.resumed_from = s.last_checkpoint = meta["path"]
        s.last_saved_step = s.step
        s.logger.note(f"resumed from {meta['path']} at step {s.step} ({s.consumed:,} samples consumed)")
    elif tr.init_from:
        found = ckpt.latest_checkpoint(tr.init_from)
        if found is None:
            raise SetupError(f"train.init_from={tr.init_from!r}: no complete checkpoint there; give the previous "
                             "stage's save_dir or one of its iter_* directories")
        _check_shape(found, s.plan.model, "train.init_from")
        ckpt.load_checkpoint(found, s.chunks)
        # bf16: the optimizer copied the (random) weights into fp32 main params when it was built
        if hasattr(s.optimizer, "reload_model_params"):
            s.optimizer.reload_model_params()
        s.logger.note(f"initialised weights from {found} (fresh optimizer and LR schedule)")


def _check_shape(path, model_cfg, key: str) -> None:
    old = ckpt.model_config_from_checkpoint(path)
    diff = [f"{f}: {getattr(old, f)} → {getattr(model_cfg, f)}" for f in SHAPE_FIELDS
            if getattr(old, f) != getattr(model_cfg, f)]
    if diff:
        raise SetupError(f"{key}: the checkpoint at {path} has another model shape ({'; '.join(diff)}); "
                         "use the same model.* shape as that run")


# ---------------------------------------------------------------------------------------- one step


def _grads_finite(chunks) -> bool:
    """Local check of the DDP gradient buffers (a NaN anywhere reaches some rank's buffer)."""
    bad = None
    for c in chunks:
        for buf in list(getattr(c, "buffers", [])) + list(getattr(c, "expert_parallel_buffers", [])):
            flag = torch.logical_not(torch.isfinite(buf.grad_data)).any()
            bad = flag if bad is None else bad | flag
    return bad is None or not bool(bad)


def train_step(s: Session, micro_batches) -> StepResult:
    """Forward/backward over this rank's micro-batches, agreed finiteness check, optimizer step."""
    from megalong.step import forward_backward

    for c in s.chunks:
        c.zero_grad_buffer()
    s.optimizer.zero_grad()
    res = forward_backward(s.chunks, micro_batches)
    finite_here = math.isfinite(res.loss) and _grads_finite(s.chunks)
    (bad,) = agree([not finite_here], device=s.ps.device)
    lr = float(s.optimizer.param_groups[0]["lr"])
    if bad:
        return StepResult(res.loss, res.weight_sum, None, False, lr)
    ok, grad_norm, _ = s.optimizer.step()
    if ok:
        s.scheduler.step(1)
    grad_norm = None if grad_norm is None or s.cfg.optim.clip_grad <= 0 else float(grad_norm)
    return StepResult(res.loss, res.weight_sum, grad_norm, True, lr)


# ---------------------------------------------------------------------------------------- checkpoints


def save(s: Session, reason: str) -> str:
    tr = s.cfg.train
    run_state = {"step": s.step, "consumed_samples": s.consumed, "tokens": s.tokens_trained, "stage": tr.stage,
                 "data": s.loader.state_dict(s.consumed), "reason": reason}
    t0 = time.perf_counter()
    path = ckpt.save_checkpoint(s.save_dir, s.step, s.chunks, s.plan.model, optimizer=s.optimizer,
                                scheduler=s.scheduler, run_state=run_state, resolved_config=s.resolved,
                                keep_last=tr.keep_last or None)
    s.last_checkpoint, s.last_saved_step = str(path), s.step
    s.logger.note(f"saved checkpoint {path} ({reason}, {time.perf_counter() - t0:.1f} s)")
    return str(path)


# ---------------------------------------------------------------------------------------- evaluation


def run_eval(s: Session) -> None:
    from megalong.train.evaluate import evaluate, source_names

    ev = s.cfg.eval
    out = evaluate(s.chunks, s.eval_loader, s.plan, ev.position_buckets, ev.batches,
                   source_names([e.path for e in ev.datasets]))
    s.last_eval, s.last_eval_step = out, s.step
    s.logger.log({"step": s.step, "stage": s.cfg.train.stage, **out}, kind="eval")


# ---------------------------------------------------------------------------------------- the loop


class _Window:
    """Sums over one log interval: losses, time, and Σ L, Σ L² of this rank's documents (tokens, L_eff)."""

    def __init__(self):
        self.losses, self.seconds, self.sq, self.lin, self.steps = [], 0.0, 0.0, 0.0, 0

    def add(self, loss: Optional[float], micro_batches, seconds: float) -> None:
        if loss is not None:
            self.losses.append(loss)
        for mb in micro_batches:
            lengths = np.diff(mb.cu_seqlens.numpy().astype(np.int64)).astype(np.float64)
            self.sq += float((lengths ** 2).sum())
            self.lin += float(lengths.sum())
        self.seconds += seconds
        self.steps += 1


def _log_step(s: Session, w: _Window, r: StepResult, peak_tflops) -> dict:
    """Global tokens and L_eff of the interval (one all-reduce over DP), then one log record."""
    from megatron.core import parallel_state as mpu

    t = torch.tensor([w.lin, w.sq], dtype=torch.float64, device=s.ps.device)
    if s.ps.dp > 1:
        dist.all_reduce(t, group=mpu.get_data_parallel_group())
    tokens, sq = float(t[0]), float(t[1])
    l_eff = sq / tokens if tokens else 0.0
    tps = tokens / w.seconds if w.seconds > 0 else 0.0
    metrics = {
        "step": s.step, "steps": s.plan.steps, "stage": s.cfg.train.stage,
        "loss": float(np.mean(w.losses)) if w.losses else float("nan"), "last_loss": r.loss,
        "weight_sum": r.weight_sum, "lr": r.lr, "grad_norm": r.grad_norm, "skipped": not r.finite,
        "tokens_per_s": tps, "tokens": s.tokens_trained, "consumed_samples": s.consumed, "l_eff": l_eff,
        "tflops_per_gpu": flops_per_token(s.plan.model, l_eff) * tps / s.ps.world_size / 1e12 if tokens else 0.0,
        "mfu": mfu(s.plan.model, l_eff, tps / s.ps.world_size, peak_tflops) if peak_tflops and tokens else None,
        "memory_gib": peak_memory_gib(s.ps.device), "step_time_s": w.seconds / max(w.steps, 1),
    }
    s.logger.log(metrics)
    return metrics


def _nonfinite(s: Session, r: StepResult) -> bool:
    """Reports a non-finite step; True when the run must stop (train.on_nan=stop)."""
    what = "loss" if not math.isfinite(r.loss) else f"gradient (loss {r.loss:.4f})"
    if s.cfg.train.on_nan == "skip":
        s.logger.note(f"non-finite {what} at step {s.step}: update skipped (train.on_nan=skip)")
        return False
    where = s.last_checkpoint or "none (this run has saved nothing yet)"
    s.logger.note(f"error: non-finite {what} at step {s.step}; stopped without applying it. Last good "
                  f"checkpoint: {where}. Resume from it with a lower optim.lr, or set train.on_nan=skip")
    return True


def fit(s: Session, signals: StopSignals, deadline: Deadline) -> tuple[str, int]:
    """Runs the stage's remaining steps; returns (status, exit code)."""
    cfg, plan, tr = s.cfg, s.plan, s.cfg.train
    G, m = plan.global_batch_size, plan.micro_batch_size
    peak = cfg.logging.peak_tflops or default_peak_tflops(s.ps.device)
    last_save_time = time.monotonic()
    window, status, code = _Window(), "completed", EXIT_OK
    while s.step < plan.steps:
        t0 = time.perf_counter()
        mbs = s.loader.micro_batches(s.consumed, G, m, s.ps.dp_rank, s.ps.dp)
        r = train_step(s, mbs)
        step_tokens = sum(mb.tokens.numel() for mb in mbs) * s.ps.dp
        s.step, s.consumed, s.tokens_trained = s.step + 1, s.consumed + G, s.tokens_trained + step_tokens
        dt = time.perf_counter() - t0
        s.run_tokens, s.run_seconds = s.run_tokens + step_tokens, s.run_seconds + dt
        window.add(r.loss if math.isfinite(r.loss) else None, mbs, dt)
        if not r.finite and _nonfinite(s, r):
            status, code = "nan", EXIT_NAN
            break
        if s.step % cfg.logging.interval == 0 or s.step == plan.steps:
            s.last_metrics = _log_step(s, window, r, peak)
            window = _Window()
        if s.eval_loader is not None and cfg.eval.interval and s.step % cfg.eval.interval == 0:
            run_eval(s)
        minutes_due = tr.save_interval_minutes > 0 and \
            (time.monotonic() - last_save_time) / 60.0 >= tr.save_interval_minutes
        # one agreed decision per step: a signal or the time limit on any rank stops every rank
        stop, time_up, minutes_due = agree([signals.received is not None, deadline.passed(), minutes_due],
                                           device=s.ps.device)
        if stop or time_up:
            status, code = ("preempted" if stop else "time_limit"), tr.interrupted_exit_code
            s.logger.note(f"{signals.received or 'a signal on another rank'} received: stopping after step {s.step}"
                          if stop else f"train.exit_duration_minutes={tr.exit_duration_minutes} reached at step "
                          f"{s.step}: stopping")
            break
        if (tr.save_interval and s.step % tr.save_interval == 0) or minutes_due:
            save(s, "minutes" if minutes_due else "interval")
            last_save_time = time.monotonic()
    if status == "completed" and s.eval_loader is not None and cfg.eval.at_end and s.last_eval_step != s.step:
        run_eval(s)
    stopped_early = status in ("preempted", "time_limit")  # always saved: the job will resume from it
    if (stopped_early or (status == "completed" and tr.save_at_end)) and s.last_saved_step != s.step:
        save(s, status)
    return status, code


def write_summary(s: Session, status: str, code: int) -> dict:
    m = s.last_metrics or {}
    summary = {
        "status": status, "exit_code": code, "stage": s.cfg.train.stage, "final_step": s.step, "steps": s.plan.steps,
        "last_loss": m.get("last_loss"), "last_eval_loss": (s.last_eval or {}).get("loss"),
        "tokens_per_s": s.run_tokens / s.run_seconds if s.run_seconds else None, "mfu": m.get("mfu"),
        "tokens_trained": s.tokens_trained, "consumed_samples": s.consumed, "checkpoint": s.last_checkpoint,
        "resumed_from": s.resumed_from, "save_dir": str(s.save_dir), "wandb_dir": s.logger.wandb_dir,
        "peak_memory_gib": peak_memory_gib(s.ps.device),
    }
    if s.is_main:
        (s.save_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def run(cfg: RunConfig, plan: RunPlan, before_fit: Optional[Callable[[Session], None]] = None) -> int:
    """One stage; returns the process exit code. Keeps the process group (main() destroys it), so
    several stages can run in one process (tests). `before_fit(session)` sees the restored state."""
    from megalong.data.packed_dataset import DatasetError
    from megalong.runtime.distributed import init_distributed

    # From the start: a preemption during setup stops after the first step; the time limit counts setup.
    signals, deadline = StopSignals(), Deadline(cfg.train.exit_duration_minutes)
    ps = init_distributed(cfg.parallel, seed=cfg.train.seed)
    try:
        s = None
        try:
            s = build(cfg, plan, ps)
            s.logger = MetricsLogger(cfg.logging, cfg.train.save_dir, s.resolved, cfg.train.stage, ps.rank == 0)
            _announce(s)
            restore(s)
        except (SetupError, ConfigError, DatasetError, FileNotFoundError) as e:
            report_error(e, ps.rank)
            return EXIT_CONFIG
        try:
            if before_fit is not None:
                before_fit(s)
            status, code = fit(s, signals, deadline)
            summary = write_summary(s, status, code)
            s.logger.note(f"{status} at step {s.step}/{plan.steps}; checkpoint {s.last_checkpoint}; "
                          f"summary {s.save_dir / 'summary.json'}")
            return summary["exit_code"]
        finally:
            s.logger.finish()
    finally:
        from megatron.core import parallel_state as mpu

        signals.restore()
        mpu.destroy_model_parallel()


def _announce(s: Session) -> None:
    if not s.is_main:
        return
    s.save_dir.mkdir(parents=True, exist_ok=True)
    text = dump_yaml(s.cfg)
    (s.save_dir / "config.yaml").write_text(text)
    p, par = s.plan, s.cfg.parallel
    print("# megalong.train resolved config\n" + text, flush=True)
    shape = f"{p.global_batch_size} samples" + (f" × {p.seq_length} tokens" if p.seq_length else " (unpacked)")
    s.logger.note(f"stage {s.cfg.train.stage}: {p.steps} steps of {shape}; {p.world_size} processes = TP"
                  f"{par.tensor_parallel} × PP{par.pipeline_parallel} × CP{par.context_parallel} × DP{p.dp}, "
                  f"{p.num_micro_batches} micro-batches of {p.micro_batch_size} per DP rank; device "
                  f"{s.ps.device.type}")
    s.logger.note(f"checkpoints, config.yaml and summary.json → {s.save_dir}")


def report_error(e: Exception, rank: int) -> None:
    """One line, on rank 0 (every rank has the same problem at setup)."""
    if rank == 0:
        print(f"megalong.train: error: {e}", file=sys.stderr, flush=True)
