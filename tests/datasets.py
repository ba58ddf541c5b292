"""Helpers shared by the data tests: run a `tools/` script as a module, and write a document dataset
(+ its `_loss` sibling) the way tools/preprocess_data.py and tools/prepare_sft.py write them."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

from megalong.data.indexed import DatasetWriter

ROOT = Path(__file__).resolve().parents[1]


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses in the tool look their module up
    spec.loader.exec_module(mod)
    return mod


def write_documents(prefix: Path, docs: list[np.ndarray], masks: list[np.ndarray] | None = None, *,
                    tokenizer: dict) -> None:
    """A document dataset (+ `_loss` sibling when masks are given) as preprocessing writes it."""
    dtype = np.int32 if tokenizer["vocab_size"] >= 65500 else np.uint16
    with DatasetWriter(prefix, dtype) as w:
        w.add_documents(np.concatenate(docs), np.array([len(d) for d in docs]))
        if masks is not None:
            with DatasetWriter(str(prefix) + "_loss", np.uint8) as lw:
                lw.add_documents(np.concatenate(masks), np.array([len(m) for m in masks]))
                lw.commit({"kind": "loss_mask"})
        w.commit({"kind": "documents", "tokenizer": tokenizer, "source_name": prefix.name})
