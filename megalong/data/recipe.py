"""A stage's data recipe: which document datasets, in what token shares, chunked to which lengths.

One YAML file per training stage (examples in `examples/data/`), loaded by the one config loader.
`tools/pack_dataset.py` turns it into a packed dataset (`megalong.data.packing` plans, the writer in
`megalong.data.packed_dataset` writes). Every check here names the recipe file and the key to change.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from megalong.config import ConfigError, load_config

SHARE_TOLERANCE = 1e-6


@dataclass
class LengthPlan:
    """A part of a source's tokens whose documents are chunked to at most `length` tokens.

    ProLong's stage 2 gives half of the code repos as 512K chunks and half as 64K chunks; the 64K
    chunks are packed several to a 512K training sequence, each one its own (masked) document.
    """

    length: int
    share: float = 1.0


@dataclass
class SourceConfig:
    name: str
    path: str  # document dataset prefix ({path}.bin/.idx/.meta.json), relative to the data root
    share: float  # fraction of the stage's tokens taken from this source
    lengths: list[LengthPlan] = field(default_factory=list)  # empty: one plan at the stage's seq_length
    # Documents longer than their plan's length: split into chunks (pretraining), keep the last
    # `length` tokens (SFT: the answer and the latest turns), or drop them. auto = split for plain
    # document datasets, truncate_left for SFT ones (those with a loss mask).
    overlong: Literal["auto", "split", "truncate_left", "drop"] = "auto"


@dataclass
class PackingOptions:
    min_chunk_length: int = 128  # a split document's last piece shorter than this is a "short leftover"
    short_leftover: Literal["drop", "pack"] = "drop"  # drop = counted as truncated tokens
    long_docs_first: bool = True  # a source's longest plan takes its longest documents first
    allow_repeat: bool = False  # let a source too small for its share repeat documents (counted)
    shuffle_segments: bool = True  # random document order inside a sample (else largest first)


@dataclass
class Recipe:
    stage: str
    seq_length: int
    sources: list[SourceConfig]
    total_tokens: int | None = None  # None (and no num_samples): as many as the scarcest source allows
    num_samples: int | None = None  # alternative to total_tokens: num_samples * seq_length tokens
    seed: int = 1234
    pad_token_id: int | None = None  # None: the tokenizer's EOD id
    packing: PackingOptions = field(default_factory=PackingOptions)


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Loads and validates a recipe YAML; raises ConfigError naming the file and key."""
    recipe = load_config(Recipe, path, overrides)
    validate_recipe(recipe, str(path))
    return recipe


def plans_of(recipe: Recipe, source: SourceConfig) -> list[LengthPlan]:
    """The source's length plans, longest first (the default is one plan at the stage length)."""
    plans = source.lengths or [LengthPlan(recipe.seq_length, 1.0)]
    return sorted(plans, key=lambda p: -p.length)


def validate_recipe(recipe: Recipe, where: str = "recipe") -> None:
    if not recipe.stage.strip():
        raise ConfigError(f"{where}: key 'stage' is empty; name the stage, e.g. prolong-stage1-64k")
    if recipe.seq_length <= 0:
        raise ConfigError(f"{where}: key 'seq_length' must be positive, got {recipe.seq_length}")
    if recipe.total_tokens is not None and recipe.num_samples is not None:
        raise ConfigError(f"{where}: set either 'total_tokens' or 'num_samples', not both")
    for key in ("total_tokens", "num_samples"):
        value = getattr(recipe, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{where}: key '{key}' must be positive, got {value}")
    if recipe.packing.min_chunk_length < 1:
        raise ConfigError(f"{where}: key 'packing.min_chunk_length' must be >= 1, "
                          f"got {recipe.packing.min_chunk_length}")
    if not recipe.sources:
        raise ConfigError(f"{where}: key 'sources' is empty; list at least one document dataset")
    seen: dict[str, int] = {}
    for i, src in enumerate(recipe.sources):
        key = f"sources[{i}]"
        if not src.name.strip():
            raise ConfigError(f"{where}: key '{key}.name' is empty")
        if src.name in seen:
            raise ConfigError(f"{where}: key '{key}.name': source name {src.name!r} is already used by "
                              f"sources[{seen[src.name]}]; names must be unique")
        seen[src.name] = i
        if not src.path.strip():
            raise ConfigError(f"{where}: key '{key}.path' is empty; give the document dataset prefix")
        if not src.share > 0:
            raise ConfigError(f"{where}: key '{key}.share' must be > 0, got {src.share} "
                              f"(remove the source to leave it out)")
        _validate_plans(recipe, src, where, f"{key}.lengths")
    total = sum(s.share for s in recipe.sources)
    if abs(total - 1.0) > SHARE_TOLERANCE:
        listing = ", ".join(f"{s.name}={s.share:g}" for s in recipe.sources)
        raise ConfigError(f"{where}: key 'sources[*].share' must sum to 1, got {total:.6g} ({listing}); "
                          "fix the shares so they add up to 1")


def _validate_plans(recipe: Recipe, src: SourceConfig, where: str, key: str) -> None:
    lengths = [p.length for p in src.lengths]
    if len(set(lengths)) != len(lengths):
        raise ConfigError(f"{where}: key '{key}': a length appears twice ({lengths}); merge those plans")
    for j, plan in enumerate(src.lengths):
        if not 0 < plan.length <= recipe.seq_length:
            raise ConfigError(f"{where}: key '{key}[{j}].length' must be in 1..seq_length ({recipe.seq_length}), "
                              f"got {plan.length}")
        if not plan.share > 0:
            raise ConfigError(f"{where}: key '{key}[{j}].share' must be > 0, got {plan.share}")
    if src.lengths:
        total = sum(p.share for p in src.lengths)
        if abs(total - 1.0) > SHARE_TOLERANCE:
            raise ConfigError(f"{where}: key '{key}[*].share' must sum to 1 within source {src.name!r}, "
                              f"got {total:.6g}")
