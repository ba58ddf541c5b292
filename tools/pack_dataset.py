#!/usr/bin/env python
r"""Packs a stage's document datasets into one packed dataset, as a recipe YAML says.

    python tools/pack_dataset.py examples/data/prolong_stage1_64k.yaml --data-root data/docs \
        --output data/packed/stage1

Writes {output}.bin/.idx, {output}_loss.bin/.idx (target masks, when any token is not a target),
{output}.meta.json (written last: achieved shares, waste, input hashes) and {output}.stats.png.
SFT data: tokenize conversations with tools/prepare_sft.py into a document dataset with a loss mask,
then pack it with a recipe like examples/data/prolong_sft_64k.yaml. Formats: docs/data_formats.md.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import megalong  # noqa: E402
from megalong.config import ConfigError, to_dict  # noqa: E402
from megalong.data.packed_dataset import write_packed_dataset  # noqa: E402
from megalong.data.packing import (PackPlan, SourceDocs, achieved_shares, check_tokenizers,  # noqa: E402
                                   file_fingerprint, open_source, plan_packing)
from megalong.data.recipe import Recipe, load_recipe  # noqa: E402

TOOL_VERSION = f"megalong {megalong.__version__} pack_dataset/1"


def build_meta(recipe: Recipe, recipe_path: str, plan: PackPlan, sources: list[SourceDocs],
               tokenizer: dict) -> dict:
    shares = achieved_shares(plan)
    entries = []
    for cfg, src, st, share in zip(recipe.sources, sources, plan.sources, shares):
        entries.append({
            "name": cfg.name, "path": src.prefix, "target_share": cfg.share, "achieved_share": share,
            "budget_tokens": st.budget_tokens, "tokens": st.tokens, "documents_used": st.documents_used,
            "documents_available": int(len(src.doc_lengths)), "epochs": st.epochs, "pieces": st.pieces,
            "samples": st.samples, "padding_tokens": st.padding_tokens, "truncated_tokens": st.truncated_tokens,
            "dropped_documents": st.dropped_documents, "dropped_tokens": st.dropped_tokens,
            "loss_mask": src.has_loss_mask,
            "lengths": [{"length": p.length, "target_share": p.target_share,
                         "achieved_share": p.tokens / max(st.tokens, 1), "tokens": p.tokens} for p in st.plans],
            "input": file_fingerprint(src.prefix),
        })
    return {"kind": "packed", "stage": recipe.stage, "recipe": {"path": recipe_path, "config": to_dict(recipe)},
            "seed": recipe.seed, "tokenizer": tokenizer, "tokens": plan.totals(), "sources": entries,
            "tool_version": TOOL_VERSION}


def plot_stats(path: str, plan: PackPlan, sources: list[SourceDocs], meta: dict) -> None:
    """Document lengths per source, segment lengths and fill of the packed samples, shares."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(21, 4.5))
    top = max(int(max((s.doc_lengths.max() for s in sources if len(s.doc_lengths)), default=1)), 2)
    bins = np.logspace(0, np.log10(top) + 0.01, 60)
    for src in sources:
        axes[0].hist(src.doc_lengths, bins=bins, histtype="step", label=src.name)
    axes[0].set(xscale="log", yscale="log", xlabel="document length (tokens)", ylabel="documents",
                title="input documents")
    axes[0].legend(fontsize=7)
    axes[1].hist(plan.piece_length, bins=bins, histtype="step")
    axes[1].axvline(plan.seq_length, color="k", ls=":", label=f"seq_length {plan.seq_length}")
    axes[1].set(xscale="log", yscale="log", xlabel="segment length (tokens)", ylabel="segments",
                title="segments in packed samples")
    axes[1].legend(fontsize=7)
    axes[2].hist(plan.sample_fill() / plan.seq_length, bins=50)
    axes[2].set(yscale="log", xlabel="non-padding fraction of the sample", ylabel="samples",
                title=f"{plan.num_samples} samples, padding {100 * meta['tokens']['padding_fraction']:.3f}%")
    names = [s["name"] for s in meta["sources"]]
    x = np.arange(len(names))
    axes[3].bar(x - 0.2, [s["target_share"] for s in meta["sources"]], 0.4, label="target")
    axes[3].bar(x + 0.2, [s["achieved_share"] for s in meta["sources"]], 0.4, label="achieved")
    axes[3].set_xticks(x, names, rotation=45, ha="right", fontsize=7)
    axes[3].set(ylabel="token share", title=f"stage {meta['stage']}")
    axes[3].legend()
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.2, top=0.92, wspace=0.28)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    Path(tmp).replace(path)


def run_pack(recipe_path: str, output: str, data_root: str | None = None, overrides=(),
             plot: bool = True, show_progress: bool = True, dry_run: bool = False) -> dict:
    """Loads the recipe, plans and writes the packed dataset; returns its meta."""
    recipe = load_recipe(recipe_path, overrides)
    root = data_root if data_root is not None else str(Path(recipe_path).parent)
    sources = [open_source(cfg, root, recipe_path, f"sources[{i}]")
               for i, cfg in enumerate(recipe.sources)]
    tokenizer = check_tokenizers(sources, recipe_path)
    pad = recipe.pad_token_id if recipe.pad_token_id is not None else tokenizer.get("eod_id")
    if pad is None:
        raise ConfigError(f"{recipe_path}: key 'pad_token_id' is unset and the sources' tokenizer has no "
                          "eod_id; set pad_token_id in the recipe")

    def progress(name, st):
        if show_progress:
            print(f"planned {name}: {st.tokens:,} tokens in {st.samples:,} samples", flush=True)
    plan = plan_packing(recipe, sources, recipe_path, progress)
    meta = build_meta(recipe, recipe_path, plan, sources, tokenizer)
    if not dry_run:
        meta = write_packed_dataset(output, plan, sources, meta, int(pad), show_progress)
        if plot:
            plot_stats(output + ".stats.png", plan, sources, meta)
    return meta


def summary(meta: dict) -> str:
    t = meta["tokens"]
    lines = [f"stage {meta['stage']}: {t['samples']:,} samples × {meta.get('seq_length', '?')} tokens, "
             f"{t['tokens']:,} data tokens",
             f"waste {100 * t['waste_fraction']:.3f}% (padding {t['padding_tokens']:,} = "
             f"{100 * t['padding_fraction']:.3f}%, truncated {t['truncated_tokens']:,}); dropped "
             f"{t['dropped_tokens']:,} tokens of overlong documents",
             f"{'source':<24}{'target':>8}{'achieved':>10}{'tokens':>16}{'epochs':>8}{'truncated':>12}"]
    for s in meta["sources"]:
        lines.append(f"{s['name']:<24}{s['target_share']:>8.4f}{s['achieved_share']:>10.4f}{s['tokens']:>16,}"
                     f"{s['epochs']:>8.2f}{s['truncated_tokens']:>12,}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", help="recipe YAML (see examples/data/ and docs/data_formats.md)")
    ap.add_argument("--output", "-o", help="output prefix: writes PREFIX.bin/.idx, PREFIX_loss.bin/.idx, "
                    "PREFIX.meta.json and PREFIX.stats.png (required unless --dry-run)")
    ap.add_argument("--data-root", help="directory that relative source paths are resolved against "
                    "(default: the recipe file's directory)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe key, e.g. --set total_tokens=1M --set seed=7 (repeatable)")
    ap.add_argument("--dry-run", action="store_true", help="plan only: print shares and waste, write nothing")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG of length distributions and shares")
    ap.add_argument("--quiet", action="store_true", help="no progress bar or per-source lines")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|deprecated).*")  # megatron import noise
    if not args.output and not args.dry_run:
        ap.error("--output is required (or use --dry-run)")
    try:
        meta = run_pack(args.recipe, args.output, args.data_root, args.overrides, not args.no_plot,
                        not args.quiet, args.dry_run)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta.setdefault("seq_length", meta["recipe"]["config"]["seq_length"])
    print(summary(meta))
    if not args.dry_run:
        print(f"wrote {args.output}.bin/.idx (+ _loss), {args.output}.meta.json"
              + ("" if args.no_plot else f", {args.output}.stats.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
