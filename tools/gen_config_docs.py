#!/usr/bin/env python
"""Generates docs/configuration.md — the reference of every key of a `python -m megalong.train`
recipe — from the config dataclasses themselves (types, defaults, and the comment beside or above
each field), so the reference cannot drift from the code. tests/test_train_config.py fails when the
committed file differs from what this script writes.

    python tools/gen_config_docs.py           # rewrite docs/configuration.md
    python tools/gen_config_docs.py --check   # exit 1 (and say so) if it is out of date
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
import types
import typing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megalong.model.config import PRESETS, ModelConfig  # noqa: E402
from megalong.train.config import RunConfig  # noqa: E402

OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
_FIELD = re.compile(r"^    (\w+)\s*:\s*[^#]*?(?:#\s*(.*))?$")


def field_comments(cls) -> dict[str, str]:
    """The trailing comment of each field line, else the comment lines just above it."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    out, above = {}, []
    for line in lines[1:]:
        stripped = line.strip()
        if stripped.startswith("#") and line.startswith("    ") and not line.startswith("     "):
            above.append(stripped.lstrip("# ").strip())
            continue
        m = _FIELD.match(line)
        if m and not stripped.startswith(("def ", "@", "return")):
            out[m.group(1)] = m.group(2) or " ".join(above)
        above = []
    return out


def type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " \\| ".join(names) + (" \\| null" if type(None) in args else "")
    if origin is typing.Literal:
        return " \\| ".join(str(a) for a in args)
    if origin in (list, tuple):
        return f"list of {type_name(args[0])}" if args else "list"
    if dataclasses.is_dataclass(tp):
        return tp.__name__
    return getattr(tp, "__name__", str(tp))


def default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if dataclasses.is_dataclass(value):
        return "(see below)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[]" if not value else repr(list(value))
    return str(value)


def table(cls, prefix: str, comments: dict[str, str] | None = None, default_override: str | None = None) -> list[str]:
    hints = typing.get_type_hints(cls)
    comments = comments if comments is not None else field_comments(cls)
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    nested = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        default = default_override if default_override and f.name != "preset" else default_text(f)
        meaning = comments.get(f.name) or FALLBACK.get(f"{prefix}.{f.name}", "")
        used.add(f"{prefix}.{f.name}")
        meaning = meaning.replace("|", "\\|")
        rows.append(f"| `{prefix}.{f.name}` | {type_name(tp)} | `{default}` | {meaning} |")
        inner = [a for a in (typing.get_args(tp) or (tp,)) if dataclasses.is_dataclass(a)]
        if inner and inner[0] not in (c for c, _ in nested):
            item = f"{prefix}.{f.name}[i]" if typing.get_origin(tp) in (list, tuple) else f"{prefix}.{f.name}"
            nested.append((inner[0], item))
    out = rows
    for sub, item in nested:
        out += ["", f"`{item}` ({sub.__name__}):", ""] + table(sub, item)
    return out


def presets_table() -> list[str]:
    keys = ["num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "ffn_hidden_size", "vocab_size",
            "head_dim", "tie_embeddings", "rope_base", "params_dtype"]
    rows = ["| preset | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, cfg in PRESETS.items():
        rows.append(f"| `{name}` | " + " | ".join(str(getattr(cfg, k)) for k in keys) + " |")
    return rows


# Meanings of fields whose class carries no comment for them (other packages' dataclasses). A key
# that no longer exists makes render() fail, so this list cannot silently drift either.
FALLBACK = {
    "model.num_layers": "transformer layers", "model.hidden_size": "model width",
    "model.num_attention_heads": "query heads", "model.num_kv_heads": "key/value heads (GQA groups)",
    "model.ffn_hidden_size": "SwiGLU inner width", "model.norm_eps": "RMSNorm epsilon",
    "model.tie_embeddings": "output layer shares the embedding matrix (Llama-3.2 1B/3B)",
    "model.rope_base": "RoPE θ (Llama-3: 5e5; ProLong stage 1: 8e6, stage 2: 1.28e8)",
    "model.rope_scaling": "Llama-3.1-style frequency scaling, or null",
    "model.max_position_embeddings": "recorded for conversion to HF; positions come from the data",
    "model.init_std": "initialisation std (irrelevant when starting from a checkpoint)",
    "model.params_dtype": "bfloat16 on GPU (fp32 main params in the optimizer), float32 on CPU",
    "model.recompute": "activation recomputation: none, selective (core attention) or full (every layer)",
    "model.name": "recorded in checkpoints",
    "model.rope_scaling.factor": "Llama-3.1 scaling factor",
    "model.rope_scaling.low_freq_factor": "Llama-3.1 low-frequency factor",
    "model.rope_scaling.high_freq_factor": "Llama-3.1 high-frequency factor",
    "model.rope_scaling.original_max_position_embeddings": "context length the scaling refers to",
    "parallel.tensor_parallel": "TP size (divides heads, KV heads and FFN width)",
    "parallel.pipeline_parallel": "PP size (divides num_layers)", "parallel.context_parallel":
    "CP size: each sample split in 2·CP zigzag chunks (sequence length must divide by 2·CP)",
    "parallel.distributed_optimizer": "shard optimizer state over DP (must equal optim.distributed_optimizer)",
    "parallel.timeout_minutes": "collective timeout",
    "optim.lr": "peak learning rate", "optim.min_lr": "learning rate at the last step",
    "optim.warmup_fraction": "fraction of the stage's steps with linear warmup from 0",
    "optim.weight_decay": "AdamW weight decay (not on norms)", "optim.beta1": "Adam β1", "optim.beta2": "Adam β2",
    "optim.eps": "Adam ε", "optim.clip_grad": "global gradient-norm clipping (0: off)",
    "optim.distributed_optimizer": "shard optimizer state over DP (megatron distributed optimizer)",
    "data.datasets": "the stage's datasets (sampled by weight, deterministic order)",
    "data.seed": "sample order (blend, shuffles per epoch)",
    "data.sort_group_size": "sorted batching group size (0: the micro-batch size)",
    "data.datasets[i].weight": "sampling weight (relative)", "eval.datasets[i].weight": "sampling weight (relative)",
}

SECTION_NOTES = {
    "model": "A `preset` plus any ModelConfig field to override it (unset fields come from the preset); "
             "without a preset, a full ModelConfig whose unset fields take the defaults shown in the "
             "ModelConfig column of `megalong/model/config.py`.",
    "parallel": "Processes = TP × PP × CP × DP; DP is what is left of the world size.",
    "optim": "megatron-core's AdamW (distributed optimizer, fp32 main params under bf16); the LR warms up "
             "over `warmup_fraction` of the stage's steps, then decays to `min_lr` at the last step.",
    "data": "The stage's packed datasets (tools/pack_dataset.py) and how samples become micro-batches.",
    "train": "Stage length, batch, checkpoints, resume and stopping.",
    "eval": "Validation on held-out packed data, also as loss vs position in the sequence.",
    "logging": "Console, Weights & Biases (offline by default) and metrics.jsonl.",
}


used: set[str] = set()


def render() -> str:
    used.clear()
    out = ["# Configuration reference", "",
           "<!-- generated by tools/gen_config_docs.py from megalong/train/config.py and the config dataclasses "
           "it uses; do not edit by hand -->", "",
           "A run recipe (`examples/*.yaml`) has the sections below. Every key can be overridden on the command "
           "line with its dotted name: `python -m megalong.train --config R.yaml train.steps=10 "
           "optim.lr=2e-5 'data.datasets=[{path: data/packed/s1}]'`. Unknown keys are errors with the closest "
           "valid names. Sizes accept `64K`, `1M`, `4_194_304`.", ""]
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        cls = hints[f.name]
        out += [f"## `{f.name}`", "", SECTION_NOTES.get(f.name, ""), ""]
        if f.name == "model":
            comments = field_comments(ModelConfig)
            comments["preset"] = "a name from the table below; null: a full ModelConfig"
            out += table(cls, "model", comments, default_override="(preset)")
            out += ["", "Presets:", ""] + presets_table()
        else:
            out += table(cls, f.name)
        out.append("")
    stale = sorted(set(FALLBACK) - used)
    if stale:
        raise KeyError(f"tools/gen_config_docs.py FALLBACK names keys that no longer exist: {stale}")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="do not write; exit 1 if the committed file is stale")
    p.add_argument("--output", default=str(OUTPUT), help=f"where to write (default {OUTPUT})")
    args = p.parse_args(argv)
    text = render()
    path = Path(args.output)
    if args.check:
        if not path.is_file() or path.read_text() != text:
            print(f"{path} is out of date: run python tools/gen_config_docs.py", file=sys.stderr)
            return 1
        print(f"{path} is up to date")
        return 0
    path.write_text(text)
    print(f"wrote {path} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
