"""Tiny learnable datasets for the trainer tests, written straight in the packed format
(docs/data_formats.md) with megalong's DatasetWriter — no megatron import, milliseconds.

Pretraining documents are arithmetic progressions mod 200 (each token predictable from the two before
it), so a tiny model's loss falls within a few dozen steps. SFT samples hold conversations whose
prompt tokens have target mask 0 and whose answers (the prompt reversed) have mask 1.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from megalong.data.indexed import DatasetWriter

TOKENIZER = {"type": "test", "path": "-", "sha256": "-", "vocab_size": 256, "eod_id": 0, "bos_id": None}


def progression(rng, n: int) -> np.ndarray:
    a, d = int(rng.integers(0, 200)), int(rng.integers(1, 8))
    return ((a + d * np.arange(n)) % 200 + 10).astype(np.int64)


def write_packed(prefix: Path, samples, seq_length: int, stage: str = "test") -> str:
    """samples: (tokens [S], target_mask [S], segment lengths)."""
    need_loss = any(not np.all(m == 1) for _, m, _ in samples)
    with DatasetWriter(prefix, np.uint16) as w:
        if need_loss:
            with DatasetWriter(str(prefix) + "_loss", np.uint8) as lw:
                for t, m, seg in samples:
                    lw.add_document(np.asarray(m, np.uint8), seg)
                lw.commit({"kind": "loss_mask"})
        for t, m, seg in samples:
            assert len(t) == seq_length == sum(seg)
            w.add_document(t, seg)
        w.commit({"kind": "packed", "stage": stage, "seq_length": seq_length, "num_samples": len(samples),
                  "tokenizer": TOKENIZER, "loss_mask": {"present": need_loss, "dtype": "uint8" if need_loss else None}})
    return str(prefix)


def pretrain_samples(seed: int, n: int, S: int, max_doc: int):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        seg, toks = [], []
        left = S
        while left:
            L = min(left, int(rng.integers(8, max_doc + 1)))
            toks.append(progression(rng, L))
            seg.append(L)
            left -= L
        out.append((np.concatenate(toks), np.ones(S, np.uint8), seg))
    return out


def sft_samples(seed: int, n: int, S: int):
    """Conversations [prompt | 1 | reversed prompt]; mask 1 on the answer only; padding at the end."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        toks, mask, seg = [], [], []
        left = S
        while left >= 24:
            p = int(rng.integers(4, min(24, (left - 1) // 2) + 1))
            prompt = rng.integers(10, 200, p)
            conv = np.concatenate([prompt, [1], prompt[::-1]])
            toks.append(conv)
            mask.append(np.concatenate([np.zeros(p + 1, np.uint8), np.ones(p, np.uint8)]))
            seg.append(len(conv))
            left -= len(conv)
        if left:
            toks.append(np.zeros(left, np.int64))
            mask.append(np.zeros(left, np.uint8))
            seg.append(left)
        out.append((np.concatenate(toks), np.concatenate(mask), seg))
    return out


def write_documents(prefix: Path, docs, masks) -> str:
    """An unpacked SFT document dataset (one conversation per document) with its loss mask."""
    with DatasetWriter(prefix, np.uint16) as w:
        with DatasetWriter(str(prefix) + "_loss", np.uint8) as lw:
            lw.add_documents(np.concatenate(masks), np.array([len(m) for m in masks]))
            lw.commit({"kind": "loss_mask"})
        w.add_documents(np.concatenate(docs), np.array([len(d) for d in docs]))
        w.commit({"kind": "documents", "tokenizer": TOKENIZER})
    return str(prefix)


def make_datasets(root: Path) -> dict[str, str]:
    """stage1 (S=128), stage1_eval (held out), stage2 (S=256), sft (S=128), sft_docs (unpacked)."""
    root = Path(root)
    paths = {
        "stage1": write_packed(root / "stage1", pretrain_samples(1, 64, 128, 96), 128),
        "stage1_b": write_packed(root / "stage1_b", pretrain_samples(2, 32, 128, 40), 128),
        "stage1_eval": write_packed(root / "stage1_eval", pretrain_samples(3, 16, 128, 96), 128),
        "stage2": write_packed(root / "stage2", pretrain_samples(4, 32, 256, 200), 256),
        "sft": write_packed(root / "sft", sft_samples(5, 48, 128), 128),
    }
    rng = np.random.default_rng(6)
    docs, masks = [], []
    for _ in range(40):
        p = int(rng.integers(4, 60))
        prompt = rng.integers(10, 200, p)
        docs.append(np.concatenate([prompt, [1], prompt[::-1]]))
        masks.append(np.concatenate([np.zeros(p + 1, np.uint8), np.ones(p, np.uint8)]))
    paths["sft_docs"] = write_documents(root / "sft_docs", docs, masks)
    return paths
