#!/usr/bin/env python
"""Planning speed and waste of packing at ProLong scale (index only: no tokens are read or written).

    python benchmarks/packing.py                      # 20B tokens per stage, both stages
    python benchmarks/packing.py --tokens 2e9 --json out.json

Synthesizes ProLong-like document lengths (log-normal per source; the medians are stated in the
table) for the sources of examples/data/prolong_stage1_64k.yaml and prolong_stage2_512k.yaml, with
~10% more tokens than each source's share needs, then times `plan_packing` (selection, chunking,
best-fit-decreasing, shuffling) and reports padding, truncation and achieved shares.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from megalong.data.packing import SourceDocs, achieved_shares, plan_packing  # noqa: E402
from megalong.data.recipe import load_recipe  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
# (median tokens, sigma of log, max tokens): long repositories and books, short web text.
LENGTHS = {
    "code_repos": (40_000, 1.4, 8_000_000), "books": (110_000, 0.8, 4_000_000),
    "textbooks": (60_000, 0.7, 2_000_000), "fineweb_edu": (700, 1.0, 200_000),
    "fineweb": (500, 1.1, 200_000), "stackexchange": (600, 1.0, 100_000),
    "wikipedia": (800, 1.2, 200_000), "tulu_v2": (500, 1.0, 50_000), "arxiv": (9_000, 0.8, 300_000),
    "openwebmath": (1_500, 1.1, 200_000),
}


def synth_lengths(name: str, tokens: float, rng: np.random.Generator) -> np.ndarray:
    median, sigma, cap = LENGTHS[name]
    mean = median * np.exp(sigma ** 2 / 2)
    n = int(tokens / mean * 1.1) + 16
    out = []
    while sum(int(x.sum()) for x in out) < tokens:
        out.append(np.clip(rng.lognormal(np.log(median), sigma, n), 16, cap).astype(np.int64))
    return np.concatenate(out)


def run_stage(recipe_file: str, tokens: float, seed: int) -> dict:
    recipe = load_recipe(EXAMPLES / recipe_file, [f"total_tokens={int(tokens)}"])
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    sources = [SourceDocs(s.name, synth_lengths(s.name, tokens * s.share * 1.1, rng)) for s in recipe.sources]
    synth_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan = plan_packing(recipe, sources, recipe_file)
    plan_s = time.perf_counter() - t0
    totals = plan.totals()
    shares = achieved_shares(plan)
    return {
        "recipe": recipe_file, "seq_length": recipe.seq_length, "target_tokens": int(tokens),
        "documents": int(sum(len(s.doc_lengths) for s in sources)), "pieces": int(len(plan.piece_length)),
        "samples": plan.num_samples, "synth_s": round(synth_s, 2), "plan_s": round(plan_s, 2),
        "padding_fraction": totals["padding_fraction"], "truncated_fraction": totals["truncated_fraction"],
        "waste_fraction": totals["waste_fraction"],
        "max_share_error": max(abs(a - s.share) for a, s in zip(shares, recipe.sources)),
        "sources": {s.name: {"target": s.share, "achieved": round(a, 5), "samples": st.samples,
                             "padding": st.padding_tokens, "truncated": st.truncated_tokens}
                    for s, a, st in zip(recipe.sources, shares, plan.sources)},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=float, default=20e9, help="tokens per stage (default 20e9, ProLong's)")
    ap.add_argument("--stages", nargs="+", default=["prolong_stage1_64k.yaml", "prolong_stage2_512k.yaml"],
                    help="recipe files in examples/data/ to plan (default: ProLong stages 1 and 2)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic document lengths")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    results = [run_stage(r, args.tokens, args.seed) for r in args.stages]
    print(f"{'recipe':<28}{'seq':>8}{'docs':>12}{'pieces':>12}{'samples':>9}{'plan s':>8}"
          f"{'padding %':>11}{'trunc %':>9}{'waste %':>9}{'share err':>10}")
    for r in results:
        print(f"{r['recipe']:<28}{r['seq_length']:>8}{r['documents']:>12,}{r['pieces']:>12,}{r['samples']:>9,}"
              f"{r['plan_s']:>8.1f}{100 * r['padding_fraction']:>11.4f}{100 * r['truncated_fraction']:>9.4f}"
              f"{100 * r['waste_fraction']:>9.4f}{r['max_share_error']:>10.5f}")
    out = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
           "tokens_per_stage": args.tokens, "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
