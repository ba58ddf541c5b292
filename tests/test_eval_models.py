"""Probes on real models: a tiny megalong model trained in-process on a synthetic retrieval task beats
its untrained self on the needle probe at its training length; the same weights as a megalong
checkpoint (saved at TP1, and resharded from TP2) and as an HF export give the same per-token
losses (1e-4), the same perplexity table and the same probe answers; the CLI end to end.

The HF export is made here by a minimal megalong → HF Llama mapping (`to_hf_state`), to be replaced
by megalong.convert once it lands (same layout facts: megalong/model/layout.py).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from megalong.data.batch import PackedSample, make_micro_batch
from megalong.eval.__main__ import main as eval_main
from megalong.eval.adapters import HFModel, MegalongModel, ensure_single_process_megatron
from megalong.eval.perplexity import evaluate_perplexity
from megalong.eval.recall import Haystack, PromptBuilder, RecallConfig, evaluate_recall
from tests.launch import torchrun
from tests.test_eval_probes import make_tokenizer, word_docs, write_documents

L = 128  # training length = the model's maximum
# One-digit values: finding the one number in the haystack and copying it is learnable in ~150 CPU
# steps; multi-digit values need induction heads, which form only after many hundreds of steps.
RECALL = RecallConfig(samples=4, value_digits=1, key_chars=4)
DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]
STEPS = 200


def tiny_config(vocab_size: int):
    """2 layers, d 64. init_std 0.1 (not 0.02): attention starts sharp enough for a 2-core CPU to
    train retrieval in ~150 steps; from 0.02 the model sits on a plateau for hundreds of steps."""
    from megalong.model.config import preset

    return preset("tiny", vocab_size=vocab_size, max_position_embeddings=L, attention_backend="reference",
                  rope_base=10000.0, init_std=0.1)


def training_batch(builder: PromptBuilder, tok, rng: np.random.Generator, seed: int, rows: int):
    """Needle prompts at random depths followed by their answer and a period; loss on those tokens."""
    samples = []
    for i in range(rows):
        s = builder.needle(L, float(rng.random()), 0, seed + i)
        tokens = np.concatenate([s.prompt, tok.encode(" " + s.answer + ".")])
        mask = np.zeros(len(tokens))
        mask[len(s.prompt):] = 1
        samples.append(PackedSample(tokens, mask, np.array([len(tokens)])))
    return make_micro_batch(samples, position_mode="reset")


def to_hf_state(full: dict, cfg) -> dict:
    """megalong full (TP1) state → HF Llama names; fused QKV rows are [q heads of group g; k_g; v_g]."""
    H, D, kv = cfg.hidden_size, cfg.kv_channels, cfg.num_kv_heads
    per = cfg.num_attention_heads // kv
    out = {"model.embed_tokens.weight": full["embedding.word_embeddings.weight"],
           "model.norm.weight": full["decoder.final_layernorm.weight"], "lm_head.weight": full["output_layer.weight"]}
    for i in range(cfg.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = full[m + "self_attention.linear_qkv.weight"].view(kv, (per + 2) * D, H)
        out[h + "self_attn.q_proj.weight"] = qkv[:, :per * D].reshape(-1, H)
        out[h + "self_attn.k_proj.weight"] = qkv[:, per * D:(per + 1) * D].reshape(-1, H)
        out[h + "self_attn.v_proj.weight"] = qkv[:, (per + 1) * D:].reshape(-1, H)
        out[h + "self_attn.o_proj.weight"] = full[m + "self_attention.linear_proj.weight"]
        gate, up = full[m + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = gate, up
        out[h + "mlp.down_proj.weight"] = full[m + "mlp.linear_fc2.weight"]
        out[h + "input_layernorm.weight"] = full[m + "input_layernorm.weight"]
        out[h + "post_attention_layernorm.weight"] = full[m + "pre_mlp_layernorm.weight"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def export_hf(full: dict, cfg, tok_dir: Path, out: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.ffn_hidden_size, num_hidden_layers=cfg.num_layers,
                         num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_kv_heads,
                         head_dim=cfg.kv_channels, max_position_embeddings=cfg.max_position_embeddings,
                         rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_base, tie_word_embeddings=False,
                         eos_token_id=0, bos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(hf_cfg)
    model.load_state_dict(to_hf_state(full, cfg), strict=True)
    model.save_pretrained(out)
    shutil.copy(tok_dir / "tokenizer.json", out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>",
                                                            "tokenizer_class": "PreTrainedTokenizerFast"}))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tokenizer, haystack data, the model untrained and trained, its checkpoint and its HF export."""
    from megalong.checkpoint import save_checkpoint
    from megalong.model.build import build_model, output_head
    from megalong.model.layout import gather_full_state

    root = tmp_path_factory.mktemp("eval_models")
    tok = make_tokenizer(root / "tok")
    docs = write_documents(root / "docs", tok, word_docs(80, seed=1))
    ensure_single_process_megatron()
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=512)
    model = build_model(cfg)
    adapter = MegalongModel(model, cfg, name="tiny")
    model.eval()
    untrained = evaluate_recall(adapter, tok, "needle", [L], DEPTHS, seed=0, cfg=RECALL, haystack_prefix=docs,
                                progress=False)
    model.train()
    builder = PromptBuilder(tok, RECALL, Haystack(docs, tok, seed=99, min_tokens=4 * L))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.98), weight_decay=0.0)
    rng = np.random.default_rng(1)
    head = output_head(model)
    from megalong.attention.module import DocumentParams

    for step in range(STEPS):
        mb = training_batch(builder, tok, rng, 10_000 + 100 * step, rows=16)
        with head.targets(mb.labels):
            ce = model(mb.tokens, mb.position_ids, None, packed_seq_params=DocumentParams.for_micro_batch(mb))[..., 0]
        loss = (ce * mb.loss_weights).sum() / mb.loss_weights.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    trained = evaluate_recall(adapter, tok, "needle", [L], DEPTHS, seed=0, cfg=RECALL, haystack_prefix=docs,
                              progress=False)
    ckpt = root / "ckpt"
    save_checkpoint(ckpt, 1, [model], cfg, resolved_config={"data": {"tokenizer": tok.describe()}})
    full = gather_full_state(model)
    hf_dir = export_hf(full, cfg, root / "tok", root / "hf")
    return {"root": root, "tok": tok, "docs": docs, "cfg": cfg, "ckpt": ckpt, "hf": hf_dir,
            "untrained": untrained, "trained": trained, "full": full}



def test_trained_model_beats_untrained_on_needle_recall(world):
    untrained, trained = world["untrained"]["mean_accuracy"], world["trained"]["mean_accuracy"]
    assert untrained <= 0.1, world["untrained"]["samples"][:3]
    assert trained >= 0.6 and trained >= untrained + 0.5, (trained, world["trained"]["samples"][:5])


def _losses_equal(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> None:
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    assert torch.nan_to_num(a - b).abs().max().item() < tol


def test_checkpoint_and_hf_export_agree(world):
    tok, docs = world["tok"], world["docs"]
    mega = MegalongModel.from_checkpoint(world["ckpt"], name="ckpt")
    hf = HFModel(world["hf"], device="cpu", dtype="float32")
    assert mega.tokenizer_record["sha256"] == hf.tokenizer_record["sha256"] == tok.describe()["sha256"]
    assert (mega.max_length, hf.max_length) == (L, L) and hf.describe()["rope_theta"] == 10000.0
    rng = np.random.default_rng(0)
    tokens = torch.from_numpy(rng.integers(1, tok.vocab_size, size=(2, L)))
    _losses_equal(mega.token_losses(tokens), hf.token_losses(tokens))
    docs_rows = [[30, 50, 48], [L]]
    a, b = mega.token_losses(tokens, docs_rows), hf.token_losses(tokens, docs_rows)
    _losses_equal(a, b)
    assert torch.isnan(a[0, 29]) and torch.isnan(a[0, 79]) and not torch.isnan(a[1]).any()
    pa = evaluate_perplexity(mega, docs, L, num_docs=6, seed=0, bucket_size=16, progress=False)
    pb = evaluate_perplexity(hf, docs, L, num_docs=6, seed=0, bucket_size=16, progress=False)
    assert pa["tokens"] == pb["tokens"] > 0
    for x, y in zip(pa["buckets"], pb["buckets"]):
        assert x["tokens"] == y["tokens"] and abs(x["mean_loss"] - y["mean_loss"]) < 1e-4
    for probe in ("needle", "jsonkv"):
        ra = evaluate_recall(mega, tok, probe, [L], [0.0, 0.5, 1.0], seed=2, cfg=RECALL, haystack_prefix=docs,
                             progress=False)
        rb = evaluate_recall(hf, tok, probe, [L], [0.0, 0.5, 1.0], seed=2, cfg=RECALL, haystack_prefix=docs,
                             progress=False)
        assert [s["generated"] for s in ra["samples"]] == [s["generated"] for s in rb["samples"]]
        assert ra["accuracy"] == rb["accuracy"]
    # the probe answers of the checkpoint are those of the model that was trained in memory
    assert world["trained"]["samples"] == evaluate_recall(mega, tok, "needle", [L], DEPTHS, seed=0, cfg=RECALL,
                                                           haystack_prefix=docs, progress=False)["samples"]


def test_checkpoint_saved_at_tp2_loads_in_one_process(world):
    """The worker loads the TP1 checkpoint at TP=2 (2 processes), saves it again; evaluating that
    TP2 checkpoint here gives the TP1 checkpoint's losses."""
    tp2 = world["root"] / "ckpt_tp2"
    torchrun(Path(__file__), 2, [world["ckpt"], tp2], timeout=300)
    assert json.loads((tp2 / "iter_0000002" / "megalong.json").read_text())["parallel"]["tp"] == 2
    tokens = torch.from_numpy(np.random.default_rng(3).integers(1, world["tok"].vocab_size, size=(2, L)))
    a = MegalongModel.from_checkpoint(world["ckpt"]).token_losses(tokens)
    b = MegalongModel.from_checkpoint(tp2).token_losses(tokens)
    _losses_equal(a, b, tol=1e-5)


def test_cli_end_to_end_and_bad_inputs(world, capsys):
    out = world["root"] / "cli"
    rc = eval_main(["all", "--ckpt", str(world["ckpt"]), "--data", world["docs"], "--lengths", "128",
                    "--depths", "0,1", "--samples", "2", "--value-digits", "3", "--key-chars", "4",
                    "--num-docs", "3", "--out", str(out), "--no-progress"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["kind"] == "megalong" and "tokenizer matches model" in summary["tokenizer_checks"][0]
    for probe in ("ppl", "needle", "jsonkv"):
        assert Path(summary[probe]["png"]).is_file() and Path(summary[probe]["json"]).is_file()
    text = capsys.readouterr().out
    assert "needle exact match" in text and "jsonkv exact match" in text and "loss in nats" in text
    rc = eval_main(["ppl", "--ckpt", str(world["ckpt"]), "--hf-dir", str(world["hf"]), "--data", world["docs"],
                    "--num-docs", "3", "--out", str(out / "cmp"), "--no-progress"])
    assert rc == 0
    both = json.loads((out / "cmp" / "ppl.json").read_text())
    assert [r["model"]["kind"] for r in both] == ["megalong", "hf"]
    assert abs(both[0]["mean_loss"] - both[1]["mean_loss"]) < 1e-4
    assert eval_main(["compare", str(out / "cmp" / "ppl.json"), str(out / "ppl.json"), "--out",
                      str(out / "cmp.png")]) == 0
    capsys.readouterr()
    rc = eval_main(["needle", "--hf-dir", str(world["hf"]), "--data", world["docs"], "--lengths", "256",
                    "--out", str(out / "x"), "--no-progress"])
    assert rc == 2 and "--max-length-override 256" in capsys.readouterr().err
    other = make_tokenizer(world["root"] / "other_tok", vocab_size=400)
    rc = eval_main(["jsonkv", "--ckpt", str(world["ckpt"]), "--tokenizer", str(other.file), "--lengths", "128",
                    "--out", str(out / "y"), "--no-progress"])
    assert rc == 2 and "tokenizer mismatch" in capsys.readouterr().err
    empty = write_documents(world["root"] / "empty", world["tok"], [])
    rc = eval_main(["needle", "--hf-dir", str(world["hf"]), "--haystack", empty, "--lengths", "128",
                    "--out", str(out / "z"), "--no-progress"])
    assert rc == 2 and "is empty" in capsys.readouterr().err


def reshard_worker(src: str, dst: str) -> None:
    """Run under torchrun with 2 processes: load a checkpoint at TP=2 and save it at TP=2."""
    from megalong.checkpoint import load_checkpoint, model_config_from_checkpoint, save_checkpoint
    from megalong.model.build import build_model
    from megalong.runtime.distributed import ParallelConfig, destroy_distributed, init_distributed

    init_distributed(ParallelConfig(tensor_parallel=2))
    cfg = model_config_from_checkpoint(src)
    model = build_model(cfg, tp=2)
    meta = load_checkpoint(src, [model])
    save_checkpoint(dst, 2, [model], cfg, resolved_config=meta["config"])
    destroy_distributed()


if __name__ == "__main__":
    import sys

    reshard_worker(sys.argv[1], sys.argv[2])
