"""`megalong <command>`: one entry point dispatching to each tool's own CLI."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "plan": ("megalong.plan.cli", "recommend TP/PP/CP/DP, recomputation and micro-batching for a run"),
    "train": ("megalong.train.__main__", "train a stage (run under torchrun/srun for several processes)"),
    "eval": ("megalong.eval.__main__", "long-context probes and the HELMET launcher"),
    "convert": ("megalong.convert.cli", "HuggingFace Llama <-> megalong checkpoints"),
    "demo": ("megalong.demo.__main__", "the whole recipe scaled down, on CPU"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: megalong <command> [args]\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<8} {text}")
        print("\ndata tools: python tools/preprocess_data.py, tools/pack_dataset.py, tools/prepare_sft.py")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
