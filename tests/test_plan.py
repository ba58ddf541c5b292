"""megalong plan: exact parameter/FLOP/memory arithmetic, the layout rules, the planner's pick, the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest

from megalong.config import ConfigError
from megalong.plan import (Calibration, Layout, MemoryOptions, PlanRequest, check_layout, flops_per_token,
                           get_gpu, get_model, l_eff, l_eff_from_cu_seqlens, load_calibration,
                           memory_breakdown, mfu, packed_l_eff, plan, predict_peak_bytes, save_calibration,
                           step_time)
from megalong.plan.cli import main, read_doc_lengths
from megalong.plan.memory import cp_key_tokens, stage_params, state_bytes_per_param
from megalong.plan.timing import attention_rate

LLAMA8B = get_model("llama3_8b")


# ---- shapes and FLOPs -------------------------------------------------------------------------

def test_parameter_counts_match_the_published_models():
    assert LLAMA8B.n_params == 8_030_261_248  # "8.03B"
    assert get_model("llama3_2_1b").n_params == 1_235_814_400  # "1.24B", tied embedding counted once
    assert round(get_model("llama3_2_3b").n_params / 1e9, 2) == 3.21
    assert round(get_model("llama3_70b").n_params / 1e9, 2) == 70.55
    # one 8B layer by hand: Q, O 4096² each; K, V 4096·1024 each; SwiGLU 3·4096·14336; two norms
    assert LLAMA8B.layer_params == 2 * 4096 ** 2 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096


def test_flops_per_token_matches_design_section_9():
    assert round(6 * LLAMA8B.matmul_params / 1e9, 1) == 45.0
    assert flops_per_token(LLAMA8B, 0) == 6 * LLAMA8B.matmul_params
    attn = flops_per_token(LLAMA8B, 65536) - flops_per_token(LLAMA8B, 0)
    assert attn == 6 * 32 * 32 * 128 * 65536  # 0.786 MFLOP × L_eff
    assert round(attn / 65536 / 1e6, 3) == 0.786
    # a tied head still multiplies: 1B's N_matmul includes the 128,256 × 2048 head once
    one_b = get_model("llama3_2_1b")
    assert one_b.matmul_params == 16 * one_b.layer_matmul_params + 128_256 * 2048


def test_l_eff_weights_documents_by_their_tokens():
    assert l_eff([8192] * 8) == 8192.0
    assert l_eff([1000, 3000]) == (1000 ** 2 + 3000 ** 2) / 4000  # 2500: the long document dominates
    torch = pytest.importorskip("torch")
    cu = torch.tensor([0, 1000, 4000], dtype=torch.int32)
    assert l_eff_from_cu_seqlens(cu) == 2500.0
    # packing cuts a 100K document into one 64K piece and a 34,464-token remainder
    assert packed_l_eff([100_000], 65536) == (65536 ** 2 + 34_464 ** 2) / 100_000
    assert packed_l_eff([512, 512], 65536) == 512.0
    with pytest.raises(ValueError, match="at least one document"):
        l_eff([])


def test_mfu_is_useful_flops_over_peak():
    expected = flops_per_token(LLAMA8B, 40_000) * 2650 / 989e12
    assert mfu(LLAMA8B, 40_000, 2650, 989.0) == pytest.approx(expected, rel=1e-12)
    assert 0.2 < expected < 0.21


def test_shapes_agree_with_the_trainers_model_presets():
    from megalong.model.config import PRESETS
    from megalong.plan import as_shape

    for name in ("llama3_8b", "llama3_2_1b", "llama3_2_3b", "tiny", "small"):
        shape = as_shape(PRESETS[name])
        assert shape == get_model(name), name
    assert flops_per_token(PRESETS["llama3_8b"], 1024) == flops_per_token("llama3_8b", 1024)


# ---- memory ----------------------------------------------------------------------------------

def test_bytes_per_parameter_of_the_distributed_optimizer():
    bf16 = MemoryOptions()
    assert sum(state_bytes_per_param(bf16, 8)) == 6 + 12 / 8  # 2 bf16 + 4 fp32 grad + 12/(DP·CP)
    assert sum(state_bytes_per_param(bf16, 1)) == 18
    assert sum(state_bytes_per_param(MemoryOptions(distributed_optimizer=False), 8)) == 18
    assert sum(state_bytes_per_param(MemoryOptions(precision="fp32"), 4)) == 8 + 8 / 4
    assert sum(state_bytes_per_param(MemoryOptions(grad_reduce_in_fp32=False), 2)) == 4 + 12 / 2


def test_states_of_llama3_8b_are_sharded_by_tp_pp_and_dp_times_cp():
    lay = Layout(tp=2, pp=1, cp=4, dp=4)
    mem = memory_breakdown(LLAMA8B, lay, 65536)
    per_gpu = (32 * (LLAMA8B.layer_matmul_params / 2 + 2 * 4096) + 2 * 128_256 * 4096 / 2 + 4096)
    assert stage_params(LLAMA8B, 2, 1, 0) == per_gpu
    assert mem.weights == 2 * per_gpu and mem.grads == 4 * per_gpu
    assert mem.optimizer == 12 * per_gpu / 16  # sharded over DP·CP = 16
    # with PP=2 the first stage holds the embedding, the last the head and the final norm
    assert stage_params(LLAMA8B, 1, 2, 0) == 16 * LLAMA8B.layer_params + 128_256 * 4096
    assert stage_params(LLAMA8B, 1, 2, 1) == 16 * LLAMA8B.layer_params + 128_256 * 4096 + 4096


def test_peak_of_the_tiny_model_by_hand():
    """tiny: 2 layers, d 64, 4 heads × 16, 2 KV heads, FFN 128, vocab 256; fp32, 128 tokens, no CP."""
    tiny = get_model("tiny")
    P = tiny.n_params
    assert P == 2 * (64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 128 + 128) + 2 * 256 * 64 + 64 == 106_816
    a, t = 4, 128
    per_layer = t * a * (4 * 64 + 2 * 64 + 3 * 128) + t * a * 2 * 32 + t * 4 * 4  # SP-wide + TP + K/V + lse
    head_saved = t * (a * 64 + a * 64 + 4)
    working = t * a * (2 * 64 + 3 * 128 + 64) + t * 4 * 64 + t * a * 2 * 32
    head_working = 128 * 256 * (a + 12) + t * a * 64  # the whole 128 tokens are one loss chunk
    expected = P * (4 + 4 + 8) + 2 * per_layer + head_saved + max(working, head_working)
    got = predict_peak_bytes(tiny, Layout(), 128, options=MemoryOptions(precision="fp32"), fixed_bytes=0)
    assert got == expected == 3_188_224


def test_recomputation_and_context_parallel_shrink_activations():
    acts = {rc: memory_breakdown(LLAMA8B, Layout(cp=8, dp=4, recompute=rc), 65536).activations
            for rc in ("none", "selective", "full")}
    assert acts["full"] < acts["selective"] < acts["none"]
    assert acts["full"] == 32 * (65536 / 8) * 2 * 4096 + (65536 / 8) * (2 * 4096 * 2 + 4)  # layer inputs + head
    a2a = memory_breakdown(LLAMA8B, Layout(tp=2, cp=4, dp=4, cp_comm="a2a"), 65536)
    ag = memory_breakdown(LLAMA8B, Layout(tp=2, cp=4, dp=4, cp_comm="allgather"), 65536)
    assert ag.activations > a2a.activations  # all-gather keeps the gathered K/V for backward


def test_pipeline_first_stage_holds_pp_micro_batches():
    from megalong.plan.memory import _layer_bytes

    saved, _ = _layer_bytes(LLAMA8B, Layout(pp=4, cp=8), 65536, 65536, a=2, sp=1)
    many = memory_breakdown(LLAMA8B, Layout(pp=4, cp=8, grad_accum=16), 65536)
    assert many.stage == 0 and many.activations == 4 * 8 * saved  # 1F1B: PP micro-batches × 8 layers
    one = memory_breakdown(LLAMA8B, Layout(pp=4, cp=8, grad_accum=1), 65536)
    assert one.stage == 3  # one micro-batch in flight: the last stage (head, logits chunk) peaks


@pytest.mark.parametrize("seq_len,cp,doc_len", [(64, 2, 64), (64, 2, 16), (96, 3, 20), (128, 4, 7), (256, 4, 300)])
def test_cp_key_tokens_match_megalongs_all_gather_layout(seq_len, cp, doc_len):
    """Parity with megalong.attention.context_parallel: the keys each rank index-selects."""
    from megalong.attention.context_parallel import attention_layout

    starts = list(range(0, seq_len, doc_len)) + [seq_len]
    cu = np.asarray(starts, dtype=np.int64)
    real = max(len(attention_layout(cu, 1, seq_len, r, cp)[4]) for r in range(cp))
    assert cp_key_tokens(seq_len, cp, doc_len) == real


# ---- layout rules ----------------------------------------------------------------------------

@pytest.mark.parametrize("layout,reason", [
    (Layout(tp=16, dp=2), "tp-node"),
    (Layout(tp=3), "tp-heads"),
    (Layout(pp=3), "pp-layers"),
    (Layout(cp=3), "cp-seq"),
    (Layout(cp=16, cp_comm="a2a"), "cp-a2a-heads"),
    (Layout(tp=2, cp=8, cp_comm="a2a"), "cp-a2a-heads"),  # 8 KV heads / TP2 = 4 per rank, not divisible by 8
    (Layout(dp=3), "batch-dp"),
])
def test_invalid_layouts_are_rejected_with_a_reason(layout, reason):
    bad = check_layout(LLAMA8B, layout, 65536, 64 * 65536, gpus_per_node=8)
    assert bad is not None and bad[0] == reason, bad


def test_valid_layouts_pass():
    for lay in (Layout(tp=2, cp=4, cp_comm="a2a"), Layout(tp=1, cp=8, cp_comm="a2a"), Layout(tp=8, cp=16),
                Layout(tp=4, pp=2, cp=4)):
        assert check_layout(LLAMA8B, lay, 65536, 64 * 65536, gpus_per_node=8) is None, lay
    # sequence parallelism: 6 tokens per CP rank do not split over TP=4, 8 do
    assert check_layout(LLAMA8B, Layout(tp=4, cp=2), 12, 12, 8)[0] == "sp-tokens"
    assert check_layout(LLAMA8B, Layout(tp=4, cp=2), 16, 16, 8) is None


# ---- time model ------------------------------------------------------------------------------

def test_step_time_is_consistent():
    lay = Layout(tp=2, pp=2, cp=4, dp=2, grad_accum=32)
    t = step_time(LLAMA8B, lay, 65536, 64 * 65536)
    assert t.tokens_per_s_per_gpu * t.step * 32 == pytest.approx(64 * 65536)
    assert t.mfu == pytest.approx(flops_per_token(LLAMA8B, 65536) * t.tokens_per_s_per_gpu / 989e12)
    per_mb = sum(getattr(t, p) for p in ("matmul", "attention", "recompute", "elementwise", "tp_comm",
                                         "cp_comm", "pp_p2p")) / 32
    assert t.bubble == pytest.approx(per_mb)  # (PP − 1) micro-batch times
    full = step_time(LLAMA8B, Layout(tp=2, pp=2, cp=4, dp=2, grad_accum=32, recompute="full"), 65536, 64 * 65536)
    assert full.step > t.step and full.recompute > t.recompute


def test_attention_rate_scales_to_other_gpus():
    cal = Calibration()
    assert attention_rate(cal, get_gpu("h100"), "cudnn") == (500.0, None)
    rate, note = attention_rate(cal, get_gpu("a100"), "cudnn")
    assert rate == pytest.approx(500.0 * 312 / 989) and "scaled" in note
    with pytest.raises(ValueError, match="no attention rate"):
        attention_rate(cal, get_gpu("h100"), "nope")


# ---- planner ---------------------------------------------------------------------------------

def test_llama3_8b_64k_on_32_h100s_gets_a_sensible_layout():
    p = plan(PlanRequest(model="llama3_8b", seq_len=65536, gpus=32, gpu="h100"))
    best = p.best
    assert best is not None
    lay = best.layout
    assert lay.world == 32 and lay.tp in (1, 2, 4, 8) and lay.tp * lay.cp <= 8  # TP and CP stay on NVLink
    assert lay.cp >= 2  # 64K full-causal activations need the sequence split
    assert best.memory.total <= p.budget_bytes <= 80e9
    assert 0.2 < best.time.mfu < 0.75
    speeds = [c.tokens_per_s_per_gpu for c in p.ranked]
    assert speeds == sorted(speeds, reverse=True)
    assert all(c.memory.total <= p.budget_bytes for c in p.ranked)
    # plain data parallelism cannot hold 64K tokens of activations: it must be among the too-big
    assert any(c.layout.tp == c.layout.pp == c.layout.cp == 1 and c.layout.recompute == "none" for c in p.too_big)
    assert any(line.startswith("Best: ") for line in p.explanation)


def test_rejections_explain_why():
    p = plan(PlanRequest(seq_len=65536, gpus=16, cp=16, cp_comm="a2a", global_batch_tokens=65536))
    assert not p.ranked
    assert [r.reason for r in p.rejections] == ["cp-a2a-heads"]
    assert "KV heads" in p.rejections[0].message
    with pytest.raises(ValueError, match="multiple of --seq-len"):
        plan(PlanRequest(seq_len=65536, global_batch_tokens=100_000))


# ---- calibration and CLI ---------------------------------------------------------------------

def test_calibration_round_trip_and_bad_key(tmp_path):
    cal = Calibration(matmul_efficiency=0.62, measured=["matmul_efficiency"], source="bench")
    save_calibration(cal, tmp_path / "cal.json")
    back = load_calibration(tmp_path / "cal.json")
    assert back == cal and "matmul_efficiency" not in back.unmeasured()
    (tmp_path / "partial.json").write_text('{"attention_tflops": {"cudnn": 520}}')
    part = load_calibration(tmp_path / "partial.json")
    assert part.attention_tflops["cudnn"] == 520 and part.attention_tflops["flex"] == 385.0
    (tmp_path / "bad.json").write_text('{"matmul_eficiency": 0.5}')
    with pytest.raises(ConfigError, match="matmul_efficiency"):
        load_calibration(tmp_path / "bad.json")


def test_cli_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = main(["--model", "llama3_8b", "--seq-len", "64K", "--gpus", "32", "--doc-len-mean", "16K",
               "--top", "3", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "tok/s/GPU" in text and "Best: " in text and "L_eff 16,384" in text
    data = json.loads(out.read_text())
    assert len(data["ranked"]) == 3 and data["l_eff"] == 16384.0
    assert "matmul_efficiency" in data["unmeasured_constants"]


def test_cli_reads_document_lengths(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(tmp_path / "docs.bin"), dtype=np.int32)
    for n in (1000, 3000):
        builder.add_item(torch.arange(n, dtype=torch.int32))
        builder.end_document()
    builder.finalize(str(tmp_path / "docs.idx"))
    assert read_doc_lengths(tmp_path / "docs.idx").tolist() == [1000, 3000]
    (tmp_path / "lens.txt").write_text("# lengths\n1000, 3000\n")
    assert read_doc_lengths(tmp_path / "lens.txt").tolist() == [1000, 3000]
    assert main(["--seq-len", "8K", "--gpus", "8", "--global-batch-tokens", "64K",
                 "--doc-lens-file", str(tmp_path / "docs.idx"), "--top", "1"]) == 0
    assert "L_eff 2,500" in capsys.readouterr().out
    (tmp_path / "bad.txt").write_text("1000\n12x\n")
    assert main(["--doc-lens-file", str(tmp_path / "bad.txt")]) == 2
    assert "bad.txt:2: '12x'" in capsys.readouterr().err


def test_cli_reports_bad_sizes(capsys):
    assert main(["--seq-len", "sixty"]) == 2
    assert "--seq-len: expected int, got 'sixty'" in capsys.readouterr().err
    assert main(["--doc-len-mean", "-3"]) == 2
    assert "--doc-len-mean '-3'" in capsys.readouterr().err
    assert main(["--seq-len", "64K", "--global-batch-tokens", "100000"]) == 2
    assert "multiple of --seq-len" in capsys.readouterr().err
