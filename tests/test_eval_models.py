"""Probes on real models: a tiny megalong model trained in-process on a synthetic retrieval task beats
its untrained self on the needle probe at its training length; the same weights as a megalong
checkpoint and as an HF export give the same per-token losses (1e-4), the same perplexity table and
the same probe answers; the CLI end to end. (Checkpoints saved at TP/PP > 1 load through the same
dist_checkpointing resharding that tests/test_train.py checks; the demo evaluates its TP2 stage 1.)

The HF export is made by megalong.convert (tools/convert_checkpoint.py megalong-to-hf).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megalong.data.batch import PackedSample, make_micro_batch
from megalong.eval.__main__ import main as eval_main
from megalong.eval.adapters import HFModel, MegalongModel, ensure_single_process_megatron
from megalong.eval.perplexity import evaluate_perplexity
from megalong.eval.recall import Haystack, PromptBuilder, RecallConfig, evaluate_recall
from tests.test_eval_probes import make_tokenizer, word_docs, write_documents

ROOT = Path(__file__).resolve().parents[1]
L = 128  # training length = the model's maximum
# One-digit values: finding the one number in the haystack and copying it is learnable in ~150 CPU
# steps; multi-digit values need induction heads, which form only after many hundreds of steps.
RECALL = RecallConfig(samples=4, value_digits=1, key_chars=4)
DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]
STEPS = 150


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


def train_on_needles(model, tok, docs: str, steps: int, seed: int = 1) -> None:
    """Plain torch AdamW on the loss from megalong's head, 16 needle prompts per step."""
    from megalong.attention.module import DocumentParams
    from megalong.model.build import output_head

    model.train()
    builder = PromptBuilder(tok, RECALL, Haystack(docs, tok, seed=99, min_tokens=4 * L))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.98), weight_decay=0.0)
    rng = np.random.default_rng(seed)
    head = output_head(model)
    for step in range(steps):
        mb = training_batch(builder, tok, rng, 10_000 + 100 * step, rows=16)
        with head.targets(mb.labels):
            ce = model(mb.tokens, mb.position_ids, None, packed_seq_params=DocumentParams.for_micro_batch(mb))[..., 0]
        loss = (ce * mb.loss_weights).sum() / mb.loss_weights.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tokenizer, haystack data, a tiny random model as a megalong checkpoint (its config names its
    training data, as the trainer's do) and as its HF export made by megalong.convert."""
    from megalong.checkpoint import save_checkpoint
    from megalong.convert.convert import megalong_to_hf
    from megalong.model.build import build_model

    root = tmp_path_factory.mktemp("eval_models")
    tok = make_tokenizer(root / "tok")
    docs = write_documents(root / "docs", tok, word_docs(80, seed=1))
    ensure_single_process_megatron()
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=512)
    ckpt, hf_dir = root / "ckpt", root / "hf"
    save_checkpoint(ckpt, 1, [build_model(cfg)], cfg, resolved_config={"data": {"datasets": [{"path": docs}]}})
    megalong_to_hf(ckpt, hf_dir, tokenizer_dir=root / "tok", dtype="float32", progress=False)
    return {"root": root, "tok": tok, "docs": docs, "ckpt": ckpt, "hf": hf_dir}


def test_trained_model_beats_untrained_on_needle_recall(world):
    from megalong.model.build import build_model

    tok, docs = world["tok"], world["docs"]
    torch.manual_seed(1)
    cfg = tiny_config(vocab_size=512)
    model = build_model(cfg).eval()
    adapter = MegalongModel(model, cfg, name="tiny")
    untrained = evaluate_recall(adapter, tok, "needle", [L], DEPTHS, seed=0, cfg=RECALL, haystack_prefix=docs,
                                progress=False)
    train_on_needles(model, tok, docs, STEPS)
    trained = evaluate_recall(adapter, tok, "needle", [L], DEPTHS, seed=0, cfg=RECALL, haystack_prefix=docs,
                              progress=False)
    assert untrained["mean_accuracy"] <= 0.1, untrained["samples"][:3]
    assert trained["mean_accuracy"] >= 0.6, trained["samples"][:5]


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
        assert [s["extracted"] for s in ra["samples"]] == [s["extracted"] for s in rb["samples"]]
        assert ra["accuracy"] == rb["accuracy"] and len(ra["samples"]) == 12


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
    # slurm/eval.sh outside SLURM: compare takes result files, helmet insists on an HF export
    env = {**os.environ, "MEGALONG_PYTHON": sys.executable, "CKPT_ROOT": str(out / "sh"),
           "EVAL_COMMAND": "compare", "EVAL_ARGS": f"{out / 'cmp' / 'ppl.json'} {out / 'ppl.json'}"}
    proc = subprocess.run(["bash", str(ROOT / "slurm" / "eval.sh")], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and (out / "sh" / "eval" / "ppl_compare.png").is_file(), proc.stderr
    proc = subprocess.run(["bash", str(ROOT / "slurm" / "eval.sh")], capture_output=True, text=True,
                          env={**env, "EVAL_COMMAND": "helmet", "EVAL_MODEL": str(world["ckpt"])})
    assert proc.returncode == 2 and "needs an HF export" in proc.stderr, proc.stderr
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

