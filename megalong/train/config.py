"""The run config of `python -m megalong.train`: one YAML recipe plus dotted command-line overrides.

Sections: `model` (a `preset` name plus ModelConfig overrides, or a full ModelConfig), `parallel`,
`optim`, `data`, `train`, `eval`, `logging`. Everything is loaded by the one config loader
(`megalong.config.load_config`), then `plan_run` checks what only the whole config can tell —
batch arithmetic against the number of processes, the CP divisibility of the sequence length, that
the datasets exist — *before* any process group or model exists, so a bad recipe costs a second
and gives a one-line error naming the key to change.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from megalong.config import ConfigError, load_config
from megalong.data.loader import DataConfig, DatasetEntry
from megalong.model.config import PRESETS, ModelConfig
from megalong.optim import OptimConfig
from megalong.runtime.distributed import ParallelConfig, env_world_size


class _Unset:
    """Marks a model field the recipe did not set: the preset's (or ModelConfig's) value is used."""

    def __repr__(self) -> str:
        return "(from the preset)"


UNSET = _Unset()


def _model_section_fields():
    hints = typing.get_type_hints(ModelConfig)
    fields = [("preset", Optional[str], field(default=None))]
    fields += [(f.name, hints[f.name], field(default=UNSET)) for f in dataclasses.fields(ModelConfig)]
    return fields


# Every ModelConfig field (same names and types) plus `preset`; generated so it can never drift.
ModelSection = dataclasses.make_dataclass("ModelSection", _model_section_fields(), namespace={
    "__doc__": "A preset name (llama3_8b, llama3_2_1b, tiny, ...) plus any ModelConfig field to override; "
               "without a preset, a full ModelConfig (unset fields take ModelConfig's defaults)."})


@dataclass
class TrainConfig:
    stage: str = "stage1"  # name in logs, checkpoints and W&B tags
    save_dir: str = "runs/megalong"  # checkpoints, resolved config, metrics.jsonl, summary.json, wandb/
    steps: Optional[int] = None  # optimizer steps of this stage (or give total_tokens)
    total_tokens: Optional[int] = None  # stage size in tokens: steps = ceil(total_tokens / tokens per step)
    global_batch_tokens: Optional[int] = None  # tokens per optimizer step (a multiple of the sequence length)
    global_batch_size: Optional[int] = None  # or: samples per optimizer step
    micro_batch_size: int = 1  # samples per forward/backward; accumulation = batch / (micro × DP)
    seed: int = 1234  # model initialisation (the data order has data.seed)
    init_from: Optional[str] = None  # start from another stage's checkpoint: weights only, fresh optimizer
    resume: str = "auto"  # auto: the save_dir's latest checkpoint if any; never; or a checkpoint path
    save_interval: int = 0  # save every N steps (0: off)
    save_interval_minutes: float = 0.0  # and/or every M minutes (0: off)
    save_at_end: bool = True  # save when the stage completes (a signal or the time limit always saves)
    keep_last: int = 3  # keep the newest K checkpoints (0: keep all)
    exit_duration_minutes: Optional[float] = None  # save and exit after this much wall time
    interrupted_exit_code: int = 0  # exit code after SIGTERM/SIGUSR1 or the time limit (e.g. 75: requeue me)
    on_nan: Literal["stop", "skip"] = "stop"  # NaN/Inf loss or gradient: stop, or skip the update


@dataclass
class EvalConfig:
    datasets: list[DatasetEntry] = field(default_factory=list)  # held-out packed data; empty: no evaluation
    interval: int = 0  # evaluate every N steps (0: only at the end, if datasets are given)
    batches: int = 1  # global batches per evaluation (always the same ones)
    global_batch_size: Optional[int] = None  # samples per eval batch (default: the training batch)
    position_buckets: int = 8  # loss vs position: buckets of seq_length / position_buckets tokens
    at_end: bool = True  # also evaluate after the last step


@dataclass
class LoggingConfig:
    interval: int = 10  # console line (rank 0), W&B point and JSONL record every N steps
    jsonl: bool = False  # also write {save_dir}/metrics.jsonl
    wandb: bool = True  # log to Weights & Biases when it imports
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"  # WANDB_MODE in the env wins
    wandb_project: str = "megalong"  # W&B project
    wandb_entity: Optional[str] = None  # W&B team or user (default: your W&B default)
    wandb_name: Optional[str] = None  # default: {stage}-{save_dir name}
    wandb_tags: list[str] = field(default_factory=list)  # extra tags (the stage name is always one)
    peak_tflops: Optional[float] = None  # accelerator dense bf16 peak for MFU (default: known GPUs; CPU: none)


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)  # type: ignore[valid-type]
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


@dataclass
class RunPlan:
    """What the config and the number of processes imply, computed once before anything starts."""

    model: ModelConfig
    world_size: int
    dp: int
    seq_length: Optional[int]  # None for unpacked (document) datasets: lengths vary per micro-batch
    global_batch_size: int  # samples per optimizer step
    micro_batch_size: int
    num_micro_batches: int  # per DP rank (gradient accumulation)
    steps: int
    eval_global_batch_size: int

    @property
    def tokens_per_step(self) -> Optional[int]:
        return None if self.seq_length is None else self.global_batch_size * self.seq_length


def resolve_model(section) -> ModelConfig:
    """The ModelConfig of a model section: preset values, then the fields the recipe set."""
    given = {f.name: getattr(section, f.name) for f in dataclasses.fields(ModelConfig)
             if getattr(section, f.name) is not UNSET}
    if section.preset is None:
        return ModelConfig(**given)
    if section.preset not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {section.preset!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[section.preset], **given)


def fill_model_section(section):
    """The section with every field set (what the resolved config prints and checkpoints record)."""
    model = resolve_model(section)
    return ModelSection(preset=section.preset, **{f.name: getattr(model, f.name) for f in dataclasses.fields(model)})


def load_run_config(path: str | Path | None, overrides=()) -> RunConfig:
    cfg = load_config(RunConfig, path, overrides)
    cfg.model = fill_model_section(cfg.model)
    return cfg


def _dataset_meta(path: str, key: str) -> dict:
    from megalong.data.indexed import IncompleteDatasetError, read_meta

    if not Path(path + ".meta.json").is_file():
        raise ConfigError(f"{key}: no dataset at {path!r} ({path}.meta.json does not exist); pack it with "
                          "tools/pack_dataset.py or point the key at an existing dataset prefix")
    try:
        return read_meta(path)
    except (IncompleteDatasetError, ValueError) as e:
        raise ConfigError(f"{key}: {e}") from None


def _seq_length(cfg: RunConfig, entries, where: str) -> Optional[int]:
    """The packed sequence length of a list of datasets (all must agree), None if unpacked."""
    lengths = {}
    for i, e in enumerate(entries):
        meta = _dataset_meta(e.path, f"{where}[{i}].path")
        lengths[e.path] = int(meta["seq_length"]) if meta.get("kind") == "packed" else None
    found = set(lengths.values())
    if len(found) > 1:
        raise ConfigError(f"{where}: datasets have different sequence lengths {lengths}; a stage trains one "
                          "length — pack them to the same seq_length")
    S = found.pop() if found else None
    if cfg.data.seq_length is not None and S is not None and S != cfg.data.seq_length:
        raise ConfigError(f"data.seq_length={cfg.data.seq_length} but {where} were packed to {S}; "
                          f"set data.seq_length={S} or pack the data again")
    return S


def plan_run(cfg: RunConfig, world_size: Optional[int] = None, check_data: bool = True) -> RunPlan:
    """Checks the whole config against the world size; raises ConfigError saying what to change."""
    world = world_size or env_world_size()
    par, tr = cfg.parallel, cfg.train
    model = resolve_model(cfg.model)
    for key in ("tensor_parallel", "pipeline_parallel", "context_parallel"):
        if getattr(par, key) < 1:
            raise ConfigError(f"parallel.{key}={getattr(par, key)} must be ≥ 1")
    mp = par.tensor_parallel * par.pipeline_parallel * par.context_parallel
    if world % mp:
        raise ConfigError(f"{world} processes are not divisible by TP×PP×CP = {par.tensor_parallel}×"
                          f"{par.pipeline_parallel}×{par.context_parallel}; change parallel.* or the number of "
                          "processes")
    dp = world // mp
    try:
        model.validate(tp=par.tensor_parallel, cp=par.context_parallel, pp=par.pipeline_parallel)
        cfg.optim.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if par.distributed_optimizer != cfg.optim.distributed_optimizer:
        raise ConfigError(f"parallel.distributed_optimizer={par.distributed_optimizer} but "
                          f"optim.distributed_optimizer={cfg.optim.distributed_optimizer}: they are one switch, "
                          "set both to the same value")
    if check_data and not cfg.data.datasets:
        raise ConfigError("data.datasets is empty; list the stage's packed datasets, e.g. "
                          "data.datasets='[{path: data/packed/stage1}]'")
    S = _seq_length(cfg, cfg.data.datasets, "data.datasets") if check_data else cfg.data.seq_length
    if check_data and cfg.eval.datasets:
        S_eval = _seq_length(cfg, cfg.eval.datasets, "eval.datasets")
        if S_eval != S:
            raise ConfigError(f"eval.datasets have sequence length {S_eval}, data.datasets {S}; evaluate on "
                              "held-out data packed like the training data")
    cp = par.context_parallel
    if S is not None and S % (2 * cp):
        raise ConfigError(f"sequence length {S} is not divisible by 2·CP = {2 * cp} (context parallelism splits "
                          "each sample into 2·CP chunks); pack to a multiple of it or change "
                          "parallel.context_parallel")
    if S is None and cfg.data.pad_to_multiple % (2 * cp):
        raise ConfigError(f"data.pad_to_multiple={cfg.data.pad_to_multiple} is not divisible by 2·CP = {2 * cp}; "
                          "unpacked micro-batches are padded to it, so make it a multiple of 2·CP")
    if S is not None:
        cfg.data.seq_length = S
    G = _global_batch(tr, S)
    m = tr.micro_batch_size
    if m < 1 or G % (m * dp):
        raise ConfigError(f"the global batch of {G} samples is not divisible by train.micro_batch_size × DP = "
                          f"{m} × {dp} (DP = {world} processes / (TP·PP·CP = {mp})); change "
                          "train.global_batch_*, train.micro_batch_size or the number of processes")
    steps = _steps(tr, G, S)
    G_eval = cfg.eval.global_batch_size or G
    if cfg.eval.datasets and G_eval % (m * dp):
        raise ConfigError(f"eval.global_batch_size={G_eval} is not divisible by train.micro_batch_size × DP = "
                          f"{m} × {dp}; change eval.global_batch_size")
    if cfg.eval.position_buckets < 1 or (S is not None and S % cfg.eval.position_buckets):
        raise ConfigError(f"eval.position_buckets={cfg.eval.position_buckets} must be ≥ 1 and divide the sequence "
                          f"length {S}")
    for key in ("save_interval", "keep_last"):
        if getattr(tr, key) < 0:
            raise ConfigError(f"train.{key}={getattr(tr, key)} must be ≥ 0")
    if cfg.logging.interval < 1:
        raise ConfigError(f"logging.interval={cfg.logging.interval} must be ≥ 1")
    return RunPlan(model=model, world_size=world, dp=dp, seq_length=S, global_batch_size=G, micro_batch_size=m,
                   num_micro_batches=G // (m * dp), steps=steps, eval_global_batch_size=G_eval)


def _global_batch(tr: TrainConfig, S: Optional[int]) -> int:
    if (tr.global_batch_tokens is None) == (tr.global_batch_size is None):
        raise ConfigError("set exactly one of train.global_batch_tokens and train.global_batch_size "
                          f"(got {tr.global_batch_tokens} and {tr.global_batch_size})")
    if tr.global_batch_size is not None:
        if tr.global_batch_size < 1:
            raise ConfigError(f"train.global_batch_size={tr.global_batch_size} must be ≥ 1")
        return tr.global_batch_size
    if S is None:
        raise ConfigError("train.global_batch_tokens needs packed data (one sequence length); unpacked "
                          "(sorted-batching) data varies in length: set train.global_batch_size in samples")
    if tr.global_batch_tokens < S or tr.global_batch_tokens % S:
        raise ConfigError(f"train.global_batch_tokens={tr.global_batch_tokens} is not a positive multiple of the "
                          f"sequence length {S}; use a multiple, e.g. {max(1, round(tr.global_batch_tokens / S)) * S}")
    return tr.global_batch_tokens // S


def _steps(tr: TrainConfig, G: int, S: Optional[int]) -> int:
    if (tr.steps is None) == (tr.total_tokens is None):
        raise ConfigError(f"set exactly one of train.steps and train.total_tokens (got {tr.steps} and "
                          f"{tr.total_tokens})")
    if tr.steps is not None:
        if tr.steps < 1:
            raise ConfigError(f"train.steps={tr.steps} must be ≥ 1")
        return tr.steps
    if S is None:
        raise ConfigError("train.total_tokens needs packed data (one sequence length); set train.steps")
    return max(1, math.ceil(tr.total_tokens / (G * S)))
