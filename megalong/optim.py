"""AdamW and its schedule through megatron-core (distributed optimizer, fp32 main params under bf16).

ProLong: AdamW wd 0.1, β 0.9/0.95, LR 1e-5 with 10% warmup then cosine to 1e-6 per stage; weight decay
skips biases and 1-D parameters (norms), as HF Trainer and Megatron-LM both do.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class OptimConfig:
    lr: float = 1e-5
    min_lr: float = 1e-6
    warmup_fraction: float = 0.1
    decay_style: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    distributed_optimizer: bool = True

    def validate(self) -> None:
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"optim.warmup_fraction={self.warmup_fraction} must be in [0, 1)")
        if self.min_lr > self.lr:
            raise ValueError(f"optim.min_lr={self.min_lr} exceeds optim.lr={self.lr}")
        if self.decay_style not in ("cosine", "linear", "constant"):
            raise ValueError(f"optim.decay_style={self.decay_style!r}: use cosine, linear or constant")


def build_optimizer(cfg: OptimConfig, model_chunks, bf16: bool = False):
    """megatron-core's optimizer for the (DDP-wrapped) chunks, with no weight decay on 1-D params."""
    from megatron.core import optimizer as mopt

    from megalong.runtime.compat import call_with_supported, dataclass_supported

    cfg.validate()
    ocfg = dataclass_supported(
        mopt.OptimizerConfig, optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.beta1, adam_beta2=cfg.beta2, adam_eps=cfg.eps, clip_grad=cfg.clip_grad, bf16=bf16,
        params_dtype=None if not bf16 else __import__("torch").bfloat16,
        use_distributed_optimizer=cfg.distributed_optimizer)
    overrides = None
    if hasattr(mopt, "get_standard_config_overrides"):
        overrides = mopt.get_standard_config_overrides(ocfg)
    # Older releases skip 1-D/bias weight decay by default (no_weight_decay_cond=None).
    return call_with_supported(mopt.get_megatron_optimizer, ocfg, list(model_chunks), config_overrides=overrides)


def build_scheduler(cfg: OptimConfig, optimizer, total_steps: int):
    """Warmup (fraction of the stage's steps) then decay to min_lr at the last step."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    warmup = int(round(cfg.warmup_fraction * total_steps))
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else cfg.lr, max_lr=cfg.lr, min_lr=cfg.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=max(total_steps, warmup + 1), lr_decay_style=cfg.decay_style,
        start_wd=cfg.weight_decay, end_wd=cfg.weight_decay, wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant")
