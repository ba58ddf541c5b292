"""Attention backends, everything that can run on a CPU.

- the one input check every backend runs (bad inputs -> ValueError naming value and fix);
- flex's document BlockMask: tile tables equal the dense mask's tile classification, mask_mod
  equals the dense mask, and the forward equals the reference (GQA, uneven documents, queries
  shorter than keys); torch has no CPU backward for flex, so that is checked on GPU by
  benchmarks/attention.py;
- cuDNN's bucketing and ragged-offset arithmetic (the graph itself needs a GPU);
- registry wiring and import safety of the GPU-only backends;
- the benchmark's --smoke run, as CI would run it.
"""
from __future__ import annotations

import importlib.util
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megalong.attention import available_backends, backend_names, get_attention_fn, resolve_backend
from megalong.attention import cudnn as cudnn_backend
from megalong.attention import flex
from megalong.attention.checks import check_attention_inputs
from megalong.attention.reference import reference_attention

ROOT = Path(__file__).resolve().parents[1]
GPU_ONLY = ["te", "cudnn", "flash_attn", "varlen"]


def cu(lens):
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32)


def dense_mask(lens_q, lens_k):
    """mask[i, j]: query token i may see key token j (per segment, bottom-right causal)."""
    tq, tk = sum(lens_q), sum(lens_k)
    mask = torch.zeros(tq, tk, dtype=torch.bool)
    qa = ka = 0
    for lq, lk in zip(lens_q, lens_k):
        for r in range(lq):
            mask[qa + r, ka:ka + r + (lk - lq) + 1] = True
        qa, ka = qa + lq, ka + lk
    return mask


def qkv(lens_q, lens_k, hq=4, hkv=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(sum(lens_q), hq, d, generator=g), torch.randn(sum(lens_k), hkv, d, generator=g),
            torch.randn(sum(lens_k), hkv, d, generator=g))


# ---------------------------------------------------------------- the shared input check

def _valid():
    q, k, v = qkv([4, 6], [5, 7])
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu([4, 6]), cu_seqlens_k=cu([5, 7]),
                max_seqlen_q=6, max_seqlen_k=7, softmax_scale=None)


BAD_INPUTS = [
    ("q", lambda a: a["q"].flatten(1), "THD"),
    ("k", lambda a: a["k"].double(), "dtypes differ"),
    ("v", lambda a: a["v"][:, :1], "differ in shape"),
    ("q", lambda a: torch.randn(10, 3, 16), "not a multiple of key/value heads"),
    ("cu_seqlens_q", lambda a: a["cu_seqlens_q"].float(), "1-D int32"),
    ("cu_seqlens_q", lambda a: torch.tensor([1, 4, 10], dtype=torch.int32), "starts at 1"),
    ("cu_seqlens_q", lambda a: torch.tensor([0, 10], dtype=torch.int32), "segments"),
    ("cu_seqlens_q", lambda a: torch.tensor([0, 4, 9], dtype=torch.int32), "ends at 9"),
    ("cu_seqlens_k", lambda a: torch.tensor([0, 3, 12], dtype=torch.int32),
     "segment 0 has 4 queries but only 3 keys"),
    ("max_seqlen_q", lambda a: 5, "max_seqlen_q=5 but the longest segment has 6"),
    ("softmax_scale", lambda a: -1.0, "softmax_scale"),
]


@pytest.mark.parametrize("field,make_bad,message", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_check_rejects_bad_inputs_with_a_named_fix(field, make_bad, message):
    args = _valid()
    args[field] = make_bad(args)
    with pytest.raises(ValueError, match="attention backend 'flex'") as err:
        check_attention_inputs(**args, backend="flex")
    assert message in str(err.value)
    assert " — " in str(err.value)  # every message carries its fix


def test_check_rejects_decreasing_offsets_and_accepts_empty_segments():
    q, k, v = qkv([4, 0, 6], [5, 0, 7])
    with pytest.raises(ValueError, match="decreases at index 2"):
        check_attention_inputs(q, k, v, torch.tensor([0, 6, 4, 10]), torch.tensor([0, 6, 5, 12]),
                               backend="cudnn")
    seg = check_attention_inputs(q, k, v, cu([4, 0, 6]), cu([5, 0, 7]), backend="cudnn")
    assert (seg.num, seg.max_q, seg.max_k, seg.equal) == (3, 6, 7, False)


def test_check_cache_sees_in_place_changes():
    args = _valid()
    assert check_attention_inputs(**args, backend="flex").max_q == 6
    args["cu_seqlens_k"][1] = 3  # now segment 0 has 4 queries over 3 keys
    with pytest.raises(ValueError, match="4 queries but only 3 keys"):
        check_attention_inputs(**args, backend="flex")


@pytest.mark.parametrize("name", GPU_ONLY + ["flex"])
def test_every_backend_runs_the_shared_check(name):
    args = _valid()
    args["cu_seqlens_q"] = torch.tensor([0, 6, 10], dtype=torch.int32)  # 6 queries over 5 keys
    args["max_seqlen_q"] = None
    with pytest.raises(ValueError, match=f"attention backend '{name}'.*6 queries but only 5 keys"):
        get_attention_fn(name)(**args)


@pytest.mark.parametrize("name", GPU_ONLY)
def test_gpu_backends_import_without_their_packages_and_refuse_cpu(name):
    args = _valid()
    with pytest.raises(ValueError, match=f"attention backend '{name}'.*CUDA"):
        get_attention_fn(name)(**args)


# ---------------------------------------------------------------- flex: block tables, mask, forward

def _random_case(rng):
    n = rng.randint(1, 6)
    lens_k = [rng.randint(0, 45) for _ in range(n)]
    lens_k[0] = max(lens_k[0], 1)
    lens_q = [rng.randint(0, lk) for lk in lens_k] if rng.random() < 0.5 else list(lens_k)
    if sum(lens_q) == 0:
        lens_q = list(lens_k)
    return lens_q, lens_k


def test_flex_block_tables_classify_every_tile_like_the_dense_mask():
    rng = random.Random(0)
    for _ in range(150):
        lens_q, lens_k = _random_case(rng)
        block = rng.choice([4, 8, 16])
        tq, tk = sum(lens_q), sum(lens_k)
        mq, nk = -(-tq // block), -(-tk // block)
        lo, hi = flex.segment_bounds(cu(lens_q), cu(lens_k), tq, mq * block)
        partial, full = flex.block_tables(lo, hi, tq, tk, block)
        mask = dense_mask(lens_q, lens_k)
        tiles = mask.new_zeros(mq * block, nk * block)
        valid = mask.new_zeros(mq * block, nk * block)
        tiles[:tq, :tk], valid[:tq, :tk] = mask, True
        tiles = tiles.view(mq, block, nk, block).transpose(1, 2)
        valid = valid.view(mq, block, nk, block).transpose(1, 2)
        want_full = (tiles | ~valid).all(-1).all(-1)
        want_any = tiles.any(-1).any(-1)
        assert torch.equal(full, want_full), (lens_q, lens_k, block)
        assert torch.equal(partial, want_any & ~want_full), (lens_q, lens_k, block)
        # and the mask_mod's per-query bounds are the dense mask itself
        keys = torch.arange(tk)[None, :]
        assert torch.equal((keys >= lo[:tq, None]) & (keys <= hi[:tq, None]), mask)


def test_flex_block_mask_tables_list_the_right_tiles():
    lens_q, lens_k = [40, 0, 90, 7], [300, 10, 130, 64]
    tq, tk, block = sum(lens_q), sum(lens_k), 16
    bm = flex.build_block_mask(cu(lens_q), cu(lens_k), tq, tk, block=block)
    lo, hi = flex.segment_bounds(cu(lens_q), cu(lens_k), tq, -(-tq // block) * block)
    partial, full = flex.block_tables(lo, hi, tq, tk, block)
    for num, idx, want in ((bm.kv_num_blocks, bm.kv_indices, partial),
                           (bm.full_kv_num_blocks, bm.full_kv_indices, full)):
        for m in range(want.shape[0]):
            n = int(num[0, 0, m])
            assert sorted(idx[0, 0, m, :n].tolist()) == torch.nonzero(want[m]).flatten().tolist()
    # the transposed (query-side) tables the backward uses cover the same tiles
    q_side = torch.zeros_like(partial)
    for n in range(partial.shape[1]):
        count = int(bm.q_num_blocks[0, 0, n])
        q_side[bm.q_indices[0, 0, n, :count].long(), n] = True
    assert torch.equal(q_side, partial)
    assert bm.seq_lengths == (tq, tk)


FORWARD_CASES = [
    ("uneven documents, GQA 4/2", [100, 200, 37], [100, 200, 37], None),
    ("queries shorter than keys, an empty query segment", [50, 0, 130, 7], [300, 10, 130, 64], None),
    ("one document over several tiles, custom scale", [300], [300], 0.3),
    ("tiny documents inside one tile", [1, 2, 3, 5, 129], [1, 2, 3, 5, 129], None),
]


@pytest.mark.parametrize("lens_q,lens_k,scale", [c[1:] for c in FORWARD_CASES],
                         ids=[c[0] for c in FORWARD_CASES])
def test_flex_forward_matches_reference_on_cpu(lens_q, lens_k, scale):
    q, k, v = qkv(lens_q, lens_k, hq=4, hkv=2, d=16, seed=len(lens_q))
    with torch.no_grad():
        got = flex.flex_attention_thd(q, k, v, cu(lens_q), cu(lens_k), None, None, scale)
        want = reference_attention(q, k, v, cu(lens_q), cu(lens_k), None, None, scale)
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_flex_refuses_cpu_backward_with_a_clear_error():
    q, k, v = qkv([20], [20])
    q.requires_grad_()
    with pytest.raises(NotImplementedError, match="no CPU backward.*reference"):
        flex.flex_attention_thd(q, k, v, cu([20]), cu([20]))


# ---------------------------------------------------------------- cuDNN: buckets and offsets

def test_cudnn_buckets_are_powers_of_two():
    assert [cudnn_backend.bucket_count(n) for n in (1, 2, 3, 8, 9, 100)] == [1, 2, 4, 8, 16, 128]
    assert ([cudnn_backend.bucket_len(n) for n in (0, 1, 128, 129, 300, 8192, 9000, 524288)]
            == [128, 128, 128, 256, 512, 8192, 16384, 524288])
    assert ([cudnn_backend.round_tokens(t) for t in (1, 128, 129, 65536, 70000)]
            == [128, 128, 256, 65536, 73728])


def test_cudnn_ragged_offsets_pad_with_empty_segments():
    c = cu([5, 0, 7])  # 3 segments, bucketed to 4
    offsets = cudnn_backend.ragged_offsets(c, 4, 8 * 128)
    assert offsets.shape == (5, 1, 1, 1) and offsets.dtype == torch.int64
    assert offsets.flatten().tolist() == [0, 5 * 1024, 5 * 1024, 12 * 1024, 12 * 1024]
    lens = cudnn_backend.seq_lens(c, 4)
    assert lens.shape == (4, 1, 1, 1) and lens.dtype == torch.int32
    assert lens.flatten().tolist() == [5, 0, 7, 0]


# ---------------------------------------------------------------- registry

def test_registry_knows_every_backend_and_keeps_reference_on_cpu():
    assert set(backend_names()) == {"reference", "flex", "cudnn", "varlen", "flash_attn", "te"}
    assert resolve_backend("auto", "cpu") == "reference"
    cpu = available_backends("cpu")
    assert cpu[0] == "reference" and not set(cpu) & set(GPU_ONLY)
    for name in GPU_ONLY:
        with pytest.raises(ValueError, match=f"backend '{name}' is not available on cpu"):
            resolve_backend(name, "cpu")


# ---------------------------------------------------------------- the benchmark

def _benchmark_module():
    spec = importlib.util.spec_from_file_location("attention_benchmark", ROOT / "benchmarks" / "attention.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_flop_count_and_document_lengths():
    bench = _benchmark_module()
    assert bench.forward_flops([8192], [8192], 32, 128) == 2 * 32 * 128 * 8192 ** 2
    assert bench.forward_flops([2], [6], 1, 1) == 4 * (2 * 6 - 2)  # 10 visible (q, k) pairs
    assert bench.doc_lengths(100, 30, "equal", random.Random(0)) == [30, 30, 30, 10]
    assert bench.doc_lengths(100, None, "equal", random.Random(0)) == [100]
    mixed = bench.doc_lengths(65536, 8192, "uniform", random.Random(0))
    assert sum(mixed) == 65536 and min(mixed) >= 1
    assert bench.parse_int("64K") == 65536 and bench.parse_doc_len("full") is None


def test_benchmark_smoke_run_writes_finite_numbers(tmp_path):
    out = tmp_path / "attention.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "attention.py"), "--smoke",
                           "--json-out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert {c["backend"] for c in result["correctness"]} == {"reference", "flex"}
    assert all(c["ok"] for c in result["correctness"])
    rows = result["rows"]
    assert {r["backend"] for r in rows} == {"reference", "flex"} and len(rows) == 4
    for row in rows:
        assert row["status"].startswith("ok") and math.isfinite(row["fwd_ms"]) and row["fwd_ms"] > 0
    for row in (r for r in rows if r["backend"] == "reference"):
        assert math.isfinite(row["fwd_bwd_ms"]) and math.isfinite(row["tflops"]) and row["tflops"] > 0
    assert "DESIGN §9" in result["meta"]["formula"]
