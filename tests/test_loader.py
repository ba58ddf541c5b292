"""Loader: blended deterministic order, DP slicing, exact resume, epochs, sorted batching."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from megalong.config import ConfigError, from_dict
from megalong.data.loader import Blend, DataConfig, GlobalBatchLoader
from megalong.data.packed_dataset import PackedDataset
from tests import datasets
from tests.datasets import load_tool

TOKENIZER = {"type": "hf", "path": "/x", "sha256": "ab", "vocab_size": 50_000, "eod_id": 3, "bos_id": None}
SEQ = 128


def write_documents(prefix: Path, docs: list[np.ndarray], masks: list[np.ndarray] | None = None) -> None:
    datasets.write_documents(prefix, docs, masks, tokenizer=TOKENIZER)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """Two packed datasets of SEQ tokens (about 37 and 23 samples)."""
    tmp = tmp_path_factory.mktemp("loader")
    rng = np.random.default_rng(0)
    pack = load_tool("pack_dataset")
    prefixes = []
    for name, n_docs, hi in (("a", 120, 80), ("b", 40, 150)):
        docs = [rng.integers(10, 40_000, int(n)) for n in rng.integers(1, hi, n_docs)]
        write_documents(tmp / name, docs)
        recipe = tmp / f"{name}.yaml"
        recipe.write_text(yaml.safe_dump({"stage": name, "seq_length": SEQ, "seed": 1,
                                          "sources": [{"name": name, "path": name, "share": 1.0}]}))
        pack.run_pack(str(recipe), str(tmp / f"packed_{name}"), str(tmp), plot=False, show_progress=False)
        prefixes.append(str(tmp / f"packed_{name}"))
    return prefixes


def config(prefixes, weights=(3.0, 1.0), **kw) -> DataConfig:
    return from_dict(DataConfig, {"datasets": [{"path": p, "weight": w} for p, w in zip(prefixes, weights)],
                                  "seq_length": SEQ, "seed": 7, **kw})


def test_blend_is_the_sorted_key_order_and_prefixes_hold_the_weights():
    for w in ([1.0], [0.5, 0.5], [3, 1, 1, 7, 0.01]):
        blend = Blend(w)
        N = 1500
        ds, ks = blend.assign(0, N)
        ref = sorted(((k + 0.5) / blend.w[d], d, k) for d in range(len(w)) for k in range(N))[:N]
        assert ds.tolist() == [d for _, d, _ in ref] and ks.tolist() == [k for _, _, k in ref]
        for n in (0, 1, 5, 17, 999, 1400):
            counts = blend.counts_before(n)
            assert counts.tolist() == np.bincount(ds[:n], minlength=len(w)).tolist()
            assert (np.abs(counts - n * blend.w) <= 0.5 + blend.w * len(w) / 2 + 1e-9).all()
            d2, k2 = blend.assign(n, 50)
            assert d2.tolist() == ds[n:n + 50].tolist() and k2.tolist() == ks[n:n + 50].tolist()


def test_dp_slices_union_equals_dp1_global_batch(packed):
    loader = GlobalBatchLoader(config(packed))
    G, m = 8, 2
    dp1 = loader.micro_batch_ids(40, G, m, 0, 1)
    dp2 = [loader.micro_batch_ids(40, G, m, r, 2) for r in range(2)]
    assert len(dp1) == 4 and all(len(x) == 2 for x in dp2)
    assert sorted(sum(dp1, [])) == sorted(sum(dp2[0] + dp2[1], []))
    for j in range(2):  # DP2 micro-batch j of rank r is DP1's micro-batch 2j + r
        for r in range(2):
            assert dp2[r][j] == dp1[2 * j + r]
    one = loader.micro_batches(40, G, m, 0, 1)
    two = loader.micro_batches(40, G, m, 0, 2) + loader.micro_batches(40, G, m, 1, 2)
    rows = lambda mbs: sorted(map(tuple, torch.cat([mb.tokens for mb in mbs]).tolist()))  # noqa: E731
    assert rows(one) == rows(two)
    assert float(sum(mb.loss_weights.sum() for mb in one)) == float(sum(mb.loss_weights.sum() for mb in two))
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        loader.micro_batch_ids(0, 6, 4, 0, 1)


def test_exact_resume_from_consumed_samples(packed):
    G, m = 6, 3
    first = GlobalBatchLoader(config(packed))
    steps = [first.micro_batches(step * G, G, m) for step in range(8)]
    state = first.state_dict(5 * G)
    assert state["consumed_samples"] == 30 and sum(state["per_dataset"].values()) == 30
    again = GlobalBatchLoader(config(packed))
    consumed = again.resume(state)
    for step in range(5, 8):
        for a, b in zip(steps[step], again.micro_batches(consumed + (step - 5) * G, G, m)):
            for field in ("tokens", "labels", "loss_weights", "position_ids", "cu_seqlens"):
                assert torch.equal(getattr(a, field), getattr(b, field))
    with pytest.raises(ConfigError, match="weights"):
        GlobalBatchLoader(config(packed, weights=(1.0, 1.0))).resume(state)
    with pytest.raises(ConfigError, match="seed"):
        GlobalBatchLoader(config(packed, seed=8)).resume(state)


def test_blend_ratios_and_epoch_shuffling(packed):
    loader = GlobalBatchLoader(config(packed))
    sizes = [len(d) for d in loader.datasets]
    ids = loader.sample_ids(0, 400)
    counts = np.bincount([d for d, _ in ids], minlength=2)
    assert abs(counts[0] - 300) <= 1 and abs(counts[1] - 100) <= 1
    for d in range(2):
        seq = [i for dd, i in ids if dd == d]
        epochs = [seq[e * sizes[d]:(e + 1) * sizes[d]] for e in range(len(seq) // sizes[d])]
        assert len(epochs) >= 2
        for ep in epochs:
            assert sorted(ep) == list(range(sizes[d]))  # every sample once per epoch
        assert epochs[0] != epochs[1]  # a fresh shuffle each epoch


def test_micro_batch_content_and_position_modes(packed):
    loader = GlobalBatchLoader(config(packed, position_ids="reset", loss_mode="sequence"))
    ids = loader.micro_batch_ids(0, 4, 2)[0]
    mb = loader.micro_batches(0, 4, 2)[0]
    for row, (d, i) in enumerate(ids):
        s = PackedDataset(packed[d])[i]
        assert torch.equal(mb.tokens[row], torch.from_numpy(s.tokens))
        starts = np.concatenate([[0], np.cumsum(s.doc_lengths)[:-1]])
        assert (mb.position_ids[row, starts] == 0).all()
        with_targets = sum(int(s.target_mask[a + 1:a + n].any()) for a, n in zip(starts, s.doc_lengths))
        assert abs(float(mb.loss_weights[row].sum()) - with_targets) < 1e-4
    assert int(mb.cu_seqlens[-1]) == 2 * SEQ


def test_sorted_batching_on_unpacked_sft(tmp_path):
    rng = np.random.default_rng(1)
    lengths = rng.integers(5, 300, 50)
    docs = [rng.integers(10, 40_000, int(n)) for n in lengths]
    masks = [(rng.random(int(n)) < 0.5).astype(np.uint8) for n in lengths]
    write_documents(tmp_path / "sft", docs, masks)
    cfg = config([str(tmp_path / "sft")], weights=(1.0,), sorted_batching=True, pad_to_multiple=16,
                 seq_length=None)
    loader = GlobalBatchLoader(cfg)
    G, m = 10, 5
    groups, seen = [], []
    for step in range(5):  # one epoch: 50 samples
        for mb_ids, mb in zip(loader.micro_batch_ids(step * G, G, m), loader.micro_batches(step * G, G, m)):
            idx = [i for _, i in mb_ids]
            seen += idx
            groups.append(sorted(lengths[idx].tolist()))
            longest = max(lengths[idx])
            assert mb.tokens.shape == (m, -(-longest // 16) * 16)
            for row, i in enumerate(idx):  # the padding segment is never a target
                n = int(lengths[i])
                assert torch.equal(mb.tokens[row, :n], torch.from_numpy(docs[i].astype(np.int64)))
                assert (mb.tokens[row, n:] == TOKENIZER["eod_id"]).all()
                assert (mb.loss_weights[row, n - 1:] == 0).all()
    assert sorted(seen) == list(range(50))
    flat = sorted(lengths.tolist())
    assert sorted(groups) == [flat[k:k + m] for k in range(0, 50, m)]  # groups of neighbours in length
    assert [g[0] for g in groups] != sorted(g[0] for g in groups)  # group order is shuffled
    again = GlobalBatchLoader(cfg)
    assert again.micro_batch_ids(20, G, m) == loader.micro_batch_ids(20, G, m)


def test_config_errors(packed, tmp_path):
    with pytest.raises(ConfigError, match="datasets is empty"):
        GlobalBatchLoader(DataConfig())
    with pytest.raises(ConfigError, match="sorted_batching"):
        GlobalBatchLoader(config(packed, sorted_batching=True))
    with pytest.raises(ConfigError, match="weight"):
        GlobalBatchLoader(config(packed, weights=(1.0, 0.0)))
    with pytest.raises(ConfigError, match="loss_mode"):
        config(packed, loss_mode="tokens")
    from megalong.data.packed_dataset import DatasetError

    with pytest.raises(DatasetError, match="seq_length"):
        GlobalBatchLoader(config(packed, seq_length=256))
