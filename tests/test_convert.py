"""HF Llama ⇄ megalong conversion: logits parity with transformers under TP/PP, bit-exact round trips,
a trained checkpoint exported to HF, the CLI end to end, and clear errors on bad input.

One 4-process launch (tests/workers/convert_worker.py) covers every layout; the CLI runs as a user
would (hf-to-megalong re-launching itself under torchrun at --tp 2); bad inputs fail before any
process group exists, so they run in this process.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megalong.convert.cli import build_parser, main
from megalong.convert.hf_io import HFWeights
from tests.launch import ROOT, torchrun

WORKER = Path(__file__).parent / "workers" / "convert_worker.py"
TOOL = ROOT / "tools" / "convert_checkpoint.py"
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1)


# ------------------------------------------------------------------------------------ parallel layouts
@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    work = tmp_path_factory.mktemp("convert_worker")
    torchrun(WORKER, 4, [work, work / "results.json"], timeout=900)
    return json.loads((work / "results.json").read_text())


VARIANTS = ("gqa_rope_scaling", "tied_padded_mha")
LOGIT_KEYS = [f"{v} {layout}" for v in VARIANTS
              for layout in ("TP1 PP1", "TP2 PP1", "TP1 PP2", "TP2 PP2", "TP1PP1->TP2PP2")]


def test_every_layout_ran(worker):
    assert sorted(worker["logits"]) == sorted(LOGIT_KEYS)


@pytest.mark.parametrize("key", LOGIT_KEYS)
def test_megalong_logits_equal_transformers(worker, key):
    assert worker["logits"][key] <= 1e-4, worker["logits"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_is_bit_identical_with_equivalent_config(worker, variant):
    r = worker["round_trip"][variant]
    assert r["bit_identical"] and r["n_tensors"] >= 38, r
    assert r["config_diff"] == {}, r


def test_trained_checkpoint_exports_to_the_same_logits(worker):
    t = worker["trained"]
    assert t["has_optimizer_keys"]  # a full training checkpoint, not weights only
    # one AdamW step (lr 1e-2) from the converted weights moves each weight by about lr, no more
    assert 5e-3 < t["max_weight_change"] < 1.1e-2, t
    assert t["trained_export_logits_abs"] <= 1e-4, t
    assert t["rope_theta"] == 8e6 and t["max_position_embeddings"] == 1024, t


def test_verify_measures_the_difference(worker):
    assert worker["verify_exported"] <= 1e-4
    assert worker["verify_mismatched"] > 1e-2  # trained weights vs the original model
    assert worker["cli_verify_mismatched_rc"] == 1  # the command's exit status above --tolerance


# ------------------------------------------------------------------------------------ helpers
def save_tiny_llama(path: Path, dtype=torch.float32, max_shard_size=None, tokenizer=False, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**dict(TINY, **overrides))).to(dtype)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), **kw)
    if tokenizer:
        from tokenizers import Tokenizer, models, pre_tokenizers
        tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(TINY["vocab_size"])}, unk_token="t2"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.save(str(path / "tokenizer.json"))
        (path / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "t0", "eos_token": "t1", "unk_token": "t2"}))
    return path


def all_tensors(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def run_tool(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)


# ------------------------------------------------------------------------------------ CLI end to end
@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """A Llama-3.2-like bf16 model (tied, rope scaling) in two shards + tokenizer, through the CLI
    (`verify` runs as a command in the 4-process worker)."""
    d = tmp_path_factory.mktemp("cli")
    hf = save_tiny_llama(d / "hf", dtype=torch.bfloat16, max_shard_size="100KB", tokenizer=True,
                         tie_word_embeddings=True, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    imported = run_tool("hf-to-megalong", "--hf-dir", hf, "--out", d / "ckpt", "--tp", "2", "--no-progress")
    assert imported.returncode == 0, imported.stdout[-3000:] + imported.stderr[-5000:]
    rc = main(["megalong-to-hf", "--ckpt", str(d / "ckpt"), "--out", str(d / "exported"), "--tokenizer-dir",
               str(hf), "--max-shard-size", "60KB", "--no-progress"])
    assert rc == 0
    return {"dir": d, "hf": hf, "imported": imported}


def test_cli_hf_to_megalong_writes_a_weights_only_checkpoint(cli):
    from megalong.checkpoint import model_config_from_checkpoint, read_meta

    meta = read_meta(cli["dir"] / "ckpt")
    cfg = model_config_from_checkpoint(cli["dir"] / "ckpt")
    assert meta["has_optimizer"] is False and meta["parallel"]["tp"] == 2
    assert cfg.params_dtype == "bfloat16" and cfg.tie_embeddings and cfg.rope_scaling.factor == 32.0
    assert '"tp": 2' in cli["imported"].stdout


def test_cli_export_is_bit_identical_and_loads_in_transformers(cli):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = cli["dir"] / "exported"
    src, dst = all_tensors(cli["hf"]), all_tensors(out)
    assert sorted(src) == sorted(dst)
    assert all(dst[k].dtype == torch.bfloat16 and torch.equal(src[k], dst[k]) for k in src)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(src) and len(set(index["weight_map"].values())) > 1
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == 500000.0 and config["rope_scaling"]["factor"] == 32.0
    assert config["bos_token_id"] == 0 and config["eos_token_id"] == 1 and config["torch_dtype"] == "bfloat16"
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 1
    assert AutoTokenizer.from_pretrained(str(out))("t5 t7").input_ids == [5, 7]
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.rope_parameters["rope_type"] == "llama3"
    assert not (cli["dir"] / "exported.partial").exists()


def test_every_flag_has_help():
    parser = build_parser()
    for sub in parser._subparsers._group_actions[0].choices.values():
        for action in sub._actions:
            assert action.help, (sub.prog, action.dest)


# ------------------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "hf")


def fails(capsys, argv, *fragments):
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    for f in fragments:
        assert f in err, err
    return err


def edited_copy(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(config_changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("change, fragment", [
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "only LlamaForCausalLM"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"attention_bias": True}, "attention_bias=true"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}}, "rope type 'yarn'"),
    ({"dtype": "float16"}, "--dtype bfloat16"),
    ({"num_hidden_layers": None}, "missing key 'num_hidden_layers'"),
])
def test_unsupported_configs_are_refused(tiny_hf, tmp_path, capsys, change, fragment):
    hf = edited_copy(tiny_hf, tmp_path / "hf", **change)
    fails(capsys, ["hf-to-megalong", "--hf-dir", hf, "--out", tmp_path / "out"], "config.json", fragment)
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_names_the_tensor(tiny_hf, tmp_path, capsys):
    hf = edited_copy(tiny_hf, tmp_path / "hf", intermediate_size=128)
    fails(capsys, ["hf-to-megalong", "--hf-dir", hf, "--out", tmp_path / "out"],
          "model.layers.0.mlp.gate_proj.weight has shape [96, 64]", "implies [128, 64]")
    assert not (tmp_path / "out").exists()


def test_unexpected_tensor_is_named(tiny_hf, tmp_path, capsys):
    hf = edited_copy(tiny_hf, tmp_path / "hf")
    tensors = load_file(str(hf / "model.safetensors"))
    tensors["model.layers.1.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
    fails(capsys, ["hf-to-megalong", "--hf-dir", hf, "--out", tmp_path / "out"],
          "unexpected tensor model.layers.1.self_attn.q_proj.bias")


def test_missing_tensor_is_named(tiny_hf, tmp_path, capsys):
    hf = edited_copy(tiny_hf, tmp_path / "hf")
    tensors = load_file(str(hf / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
    fails(capsys, ["hf-to-megalong", "--hf-dir", hf, "--out", tmp_path / "out"],
          "tensor model.layers.1.mlp.up_proj.weight is missing")


def test_missing_shard_and_missing_index(tmp_path, capsys):
    hf = save_tiny_llama(tmp_path / "hf", max_shard_size="100KB")
    shards = sorted(hf.glob("model-*.safetensors"))
    assert len(shards) >= 2
    shards[-1].unlink()
    fails(capsys, ["hf-to-megalong", "--hf-dir", hf, "--out", tmp_path / "out"],
          "model.safetensors.index.json", f"shard {shards[-1].name} is missing")
    (hf / "model.safetensors.index.json").unlink()
    fails(capsys, ["hf-to-megalong", "--hf-dir", hf, "--out", tmp_path / "out"],
          "no model.safetensors or model.safetensors.index.json", "is model.safetensors.index.json missing?")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tp, fragment", [(3, "num_attention_heads=4 is not divisible by tensor parallel size 3"),
                                          (4, "num_kv_heads=2 is not divisible by tensor parallel size 4")])
def test_tp_must_divide_heads_and_kv_heads(tiny_hf, tmp_path, capsys, tp, fragment):
    fails(capsys, ["hf-to-megalong", "--hf-dir", tiny_hf, "--out", tmp_path / "out", "--tp", tp], fragment)
    assert not (tmp_path / "out").exists()


def test_bin_weights_need_the_unsafe_flag(tiny_hf, tmp_path, capsys):
    hf = edited_copy(tiny_hf, tmp_path / "hf")
    tensors = load_file(str(hf / "model.safetensors"))
    (hf / "model.safetensors").unlink()
    torch.save(tensors, hf / "pytorch_model.bin")
    fails(capsys, ["hf-to-megalong", "--hf-dir", hf, "--out", tmp_path / "out"], "--allow-unsafe-bin")
    weights = HFWeights(hf, allow_unsafe_bin=True)
    name = "model.layers.0.self_attn.k_proj.weight"
    assert weights.shapes[name] == (32, 64) and torch.equal(weights.get(name), tensors[name])


def test_existing_output_is_not_touched(tiny_hf, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    fails(capsys, ["hf-to-megalong", "--hf-dir", tiny_hf, "--out", tmp_path / "out"], "choose a new --out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_damaged_checkpoint_leaves_no_partial_export(cli, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(cli["dir"] / "ckpt", ckpt)
    for f in (ckpt / "iter_0000000").glob("*.distcp"):
        if f.stat().st_size > 20000:
            f.write_bytes(f.read_bytes()[:1000])  # truncated data file
    fails(capsys, ["megalong-to-hf", "--ckpt", ckpt, "--out", tmp_path / "hf", "--no-progress"],
          "the checkpoint's files are incomplete or damaged")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.partial").exists()
    fails(capsys, ["megalong-to-hf", "--ckpt", tmp_path / "nothing", "--out", tmp_path / "hf"],
          "no complete megalong checkpoint")


def test_verify_refuses_unrelated_inputs_before_starting(cli, tiny_hf, tmp_path, capsys):
    fails(capsys, ["verify", "--hf-dir", tiny_hf, "--ckpt", tmp_path / "nothing", "--tp", 2],
          "no complete megalong checkpoint")
    other = edited_copy(tiny_hf, tmp_path / "hf", vocab_size=300)
    fails(capsys, ["verify", "--hf-dir", other, "--ckpt", cli["dir"] / "ckpt", "--tp", 2],
          "vocab_size=300 but the checkpoint's is 256")
