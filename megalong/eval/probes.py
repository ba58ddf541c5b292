"""Runs the built-in probes on one model and writes JSON tables, PNG figures and a console summary.

`run_probes` is the Python entry point (the demo and the trainer call it; the CLI builds on the same
pieces). Inputs are checked before any model time is spent: lengths against the model's maximum,
the tokenizer against the model's and the data's records, the data and haystack for existence.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from megalong.eval.common import (EvalError, check_lengths, check_tokenizer, dataset_tokenizer, format_length,
                                  open_token_dataset)
from megalong.eval.perplexity import evaluate_perplexity, format_ppl_table
from megalong.eval.plots import plot_ppl_curves, plot_recall_heatmap
from megalong.eval.recall import RecallConfig, evaluate_recall, format_recall_table

ALL_PROBES = ("ppl", "needle", "jsonkv")


def check_model_tokenizer(adapter, tokenizer) -> str:
    """The tokenizer must fit the model's embedding and be the one the model records, if it does."""
    if tokenizer.vocab_size > adapter.vocab_size:
        raise EvalError(f"tokenizer mismatch: {tokenizer.file} has {tokenizer.vocab_size} tokens but model "
                        f"{adapter.name} only {adapter.vocab_size} embeddings; pass the model's own tokenizer")
    return check_tokenizer(tokenizer, adapter.tokenizer_record, f"model {adapter.name}")


def check_data_tokenizer(tokenizer, prefix: str, flag: str) -> str:
    open_token_dataset(prefix, flag)  # a clear error when the dataset is missing or incomplete
    return check_tokenizer(tokenizer, dataset_tokenizer(prefix), f"{flag} {prefix}")


def write_json(path: Path, data) -> str:
    path.write_text(json.dumps(data, indent=1, default=float) + "\n")
    return str(path)


def run_probes(adapter, tokenizer, haystack_prefix: Optional[str], lengths: Sequence[int],
               depths: Sequence[float], out_dir: str | Path, seed: int = 0, *,
               probes: Sequence[str] = ALL_PROBES, ppl_data: Optional[str] = None, ppl_length: Optional[int] = None,
               num_docs: int = 8, bucket_size: Optional[int] = None, recall: Optional[RecallConfig] = None,
               max_length_override: Optional[int] = None, max_batch_tokens: int = 16384, progress: bool = True,
               wandb_run: Optional[str] = None, verbose: bool = True) -> dict:
    """Perplexity by position (on `ppl_data`, default the haystack dataset) and the needle / JsonKV
    recall probes at `lengths` × `depths`. Returns a summary with the headline numbers and the paths
    of every JSON and PNG written under `out_dir`."""
    unknown = [p for p in probes if p not in ALL_PROBES]
    if unknown:
        raise EvalError(f"unknown probe(s) {unknown}; choose from {', '.join(ALL_PROBES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lengths = sorted(set(int(n) for n in lengths))
    ppl_data = ppl_data or haystack_prefix
    ppl_length = int(ppl_length or max(lengths))
    check_lengths(lengths + ([ppl_length] if "ppl" in probes else []), adapter.max_length, max_length_override,
                  adapter.name)
    notes = [check_model_tokenizer(adapter, tokenizer)]
    if "needle" in probes:
        if not haystack_prefix:
            raise EvalError("the needle probe needs a haystack dataset: pass --haystack (or --data)")
        notes.append(check_data_tokenizer(tokenizer, haystack_prefix, "haystack"))
    if "ppl" in probes:
        if not ppl_data:
            raise EvalError("the ppl probe needs held-out data: pass --data (a document or packed dataset)")
        if ppl_data != haystack_prefix or "needle" not in probes:
            notes.append(check_data_tokenizer(tokenizer, ppl_data, "data"))
    summary: dict = {"model": adapter.describe(), "seed": seed, "lengths": lengths, "depths": list(depths),
                     "tokenizer_checks": notes, "files": {}}
    results: dict = {}
    if "ppl" in probes:
        r = evaluate_perplexity(adapter, ppl_data, ppl_length, num_docs, seed, bucket_size, max_batch_tokens, progress)
        results["ppl"] = r
        summary["ppl"] = {"length": ppl_length, "mean_loss": r["mean_loss"], "ppl": r["ppl"], "tokens": r["tokens"],
                          "json": write_json(out / "ppl.json", [r]), "png": plot_ppl_curves([r], out / "ppl.png")}
    for probe in ("needle", "jsonkv"):
        if probe not in probes:
            continue
        r = evaluate_recall(adapter, tokenizer, probe, lengths, depths, seed, recall,
                            haystack_prefix if probe == "needle" else None, max_length_override,
                            max_batch_tokens, progress)
        results[probe] = r
        summary[probe] = {"mean_accuracy": r["mean_accuracy"], "by_length": r["by_length"],
                          "json": write_json(out / f"{probe}.json", r),
                          "png": plot_recall_heatmap(r, out / f"{probe}.png")}
    summary["pngs"] = [summary[p]["png"] for p in ALL_PROBES if p in summary]
    summary["files"]["summary"] = str(out / "summary.json")
    write_json(out / "summary.json", summary)
    if verbose:
        print(format_summary(summary, results))
    if wandb_run:
        log_to_wandb(wandb_run, summary)
    return summary


def format_summary(summary: dict, results: dict) -> str:
    m = summary["model"]
    lines = ["", f"== megalong eval: {m['name']} ({m['kind']}, max length {format_length(m['max_length'])}, "
             f"rope_theta {m.get('rope_theta')}) =="]
    lines += [f"  {n}" for n in summary["tokenizer_checks"]]
    if "ppl" in results:
        lines += ["", format_ppl_table([results["ppl"]])]
    for probe in ("needle", "jsonkv"):
        if probe in results:
            lines += ["", format_recall_table(results[probe])]
    lines += ["", "files: " + ", ".join(summary["pngs"] + [summary["files"]["summary"]])]
    return "\n".join(lines)


def wandb_payload(summary: dict, prefix: str = "eval") -> dict:
    """Scalars to log: overall and per-bucket loss, recall accuracy overall and per length."""
    out: dict = {}
    if "ppl" in summary:
        out[f"{prefix}/ppl/mean_loss"] = summary["ppl"]["mean_loss"]
        out[f"{prefix}/ppl/ppl"] = summary["ppl"]["ppl"]
        rows = json.loads(Path(summary["ppl"]["json"]).read_text())[0]["buckets"]
        for b in rows:
            if b["mean_loss"] is not None:
                out[f"{prefix}/ppl/loss@{format_length(b['start'])}-{format_length(b['end'])}"] = b["mean_loss"]
    for probe in ("needle", "jsonkv"):
        if probe in summary:
            out[f"{prefix}/{probe}/accuracy"] = summary[probe]["mean_accuracy"]
            for L, acc in summary[probe]["by_length"].items():
                out[f"{prefix}/{probe}/accuracy@{format_length(int(L))}"] = acc
    return out


def parse_wandb_run(spec: str) -> dict:
    """'[entity/]project/run_id' or 'run_id' (project from WANDB_PROJECT, else 'megalong')."""
    import os

    parts = [p for p in spec.split("/") if p]
    if not 1 <= len(parts) <= 3:
        raise EvalError(f"--wandb-run {spec!r}: write [entity/]project/run_id or run_id")
    keys = {1: ("id",), 2: ("project", "id"), 3: ("entity", "project", "id")}[len(parts)]
    kw = dict(zip(keys, parts))
    kw.setdefault("project", os.environ.get("WANDB_PROJECT", "megalong"))
    return kw


def log_to_wandb(spec: str, summary: dict) -> None:
    """Logs the scalars and figures to W&B: into the active run, else resuming run `spec`."""
    import wandb

    run, own = wandb.run, False
    if run is None:
        run, own = wandb.init(**parse_wandb_run(spec), resume="allow", job_type="eval"), True
    payload = wandb_payload(summary)
    for probe in ALL_PROBES:
        if probe in summary:
            payload[f"eval/{probe}/figure"] = wandb.Image(summary[probe]["png"])
    run.log(payload)
    if own:
        run.finish()
