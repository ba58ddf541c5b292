"""megalong's trainer: `python -m megalong.train --config RECIPE.yaml [key=value ...]` (docs/training.md).

Kept import-free: dist_checkpointing's writer processes re-import the main module (and with `-m`,
this package) when they start, so every import here would be paid again at the first save.
"""
__all__ = ["RunConfig", "RunPlan", "load_run_config", "plan_run"]


def __getattr__(name):
    if name in __all__:
        from megalong.train import config

        return getattr(config, name)
    raise AttributeError(f"module 'megalong.train' has no attribute {name!r}")
