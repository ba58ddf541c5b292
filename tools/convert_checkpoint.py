#!/usr/bin/env python
"""HuggingFace Llama ⇄ megalong checkpoints; see `--help` and docs/checkpoint_conversion.md.

    python tools/convert_checkpoint.py hf-to-megalong --hf-dir Meta-Llama-3-8B-Instruct --out ckpt/llama3_8b
    python tools/convert_checkpoint.py megalong-to-hf --ckpt runs/stage2/checkpoints --out hf/prolong \
        --tokenizer-dir Meta-Llama-3-8B-Instruct
    python tools/convert_checkpoint.py verify --hf-dir hf/prolong --ckpt runs/stage2/checkpoints --tp 2
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megalong.convert.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
