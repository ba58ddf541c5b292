"""HELMET launcher: HELMET's dataset table and config format, the export checks (rope_theta in the
format HELMET's transformers reads, max length, tokenizer, weights), the checked-in configs, and a
run against a stand-in HELMET checkout whose eval.py records how it was called."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from megalong.eval.common import EvalError
from megalong.eval.helmet import (CATEGORIES, HELMET_LENGTHS, category_config, check_export, dataset_entry,
                                  fix_config, run_helmet, write_helmet_configs)
from tests.test_eval_probes import make_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def fake_export(d: Path, tok_dir: Path, **config) -> Path:
    """A directory with what an export holds; weights are a placeholder file (never loaded here)."""
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 1024,
           "max_position_embeddings": 131072, "rope_theta": 8000000.0, "hidden_size": 64}
    cfg.update(config)
    (d / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    (d / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>",
                                                          "tokenizer_class": "PreTrainedTokenizerFast"}))
    (d / "model.safetensors").write_bytes(b"placeholder")
    return d


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("helmet_tok")
    make_tokenizer(d)
    return d


def test_dataset_table_matches_helmet():
    assert dataset_entry("json_kv", 131072) == {
        "input_max_length": 131072, "datasets": "json_kv", "generation_max_length": 100,
        "test_files": "data/json_kv/test_k1800_dep6.jsonl", "demo_files": ""}
    assert dataset_entry("ruler_niah_mk_3", 32768)["test_files"] == "data/ruler/niah_multikey_3/validation_32768.jsonl"
    assert dataset_entry("kilt_popqa", 65536)["datasets"] == "kilt_popqa_3"
    assert dataset_entry("kilt_hotpotqa", 65536)["test_files"] == "data/kilt/hotpotqa-dev-multikilt_1000_k440_dep3.jsonl"
    assert dataset_entry("narrativeqa", 131072)["datasets"] == "narrativeqa_130772"
    assert dataset_entry("icl_banking77", 65536)["datasets"] == "icl_banking77_2900shot_balance"
    assert dataset_entry("alce_asqa", 32768)["datasets"] == "alce_asqa_165"
    with pytest.raises(EvalError, match="HELMET length 8192"):
        dataset_entry("json_kv", 8192)
    cfg = category_config("recall", [32768, 65536], "/m")
    assert cfg["datasets"].split(",") == ["ruler_niah_mk_2"] * 2 + ["ruler_niah_mk_3"] * 2 + ["ruler_niah_mv"] * 2 + ["json_kv"] * 2
    assert cfg["input_max_length"] == "32768,65536,32768,65536,32768,65536,32768,65536"
    assert cfg["demo_files"] == ",,,,,,," and cfg["shots"] == 2 and cfg["model_name_or_path"] == "/m"
    for c in CATEGORIES:
        cfg = category_config(c, list(HELMET_LENGTHS), None)
        n = len(cfg["datasets"].split(","))
        assert all(len(str(cfg[k]).split(",")) == n for k in ("input_max_length", "generation_max_length",
                                                               "test_files", "demo_files"))


def test_checked_in_configs_are_the_generated_ones(tmp_path):
    written = write_helmet_configs(tmp_path, HELMET_LENGTHS, list(CATEGORIES))
    for path in written:
        checked_in = ROOT / "configs" / "helmet" / Path(path).name
        assert checked_in.is_file(), f"{checked_in} missing: regenerate configs/helmet (docs/evaluation.md)"
        assert yaml.safe_load(checked_in.read_text()) == yaml.safe_load(Path(path).read_text())


def test_export_checks(tok_dir, tmp_path):
    good = fake_export(tmp_path / "good", tok_dir)
    report = check_export(good, HELMET_LENGTHS)
    assert report["rope_theta"] == 8e6 and report["max_position_embeddings"] == 131072
    assert report["chat_template"] is False
    v5 = fake_export(tmp_path / "v5", tok_dir, rope_theta=None,
                     rope_parameters={"rope_theta": 8e6, "rope_type": "default"})
    with pytest.raises(EvalError, match=r"only in rope_parameters.*--fix-config"):
        check_export(v5, HELMET_LENGTHS)
    fix_config(v5)
    assert check_export(v5, HELMET_LENGTHS)["rope_theta"] == 8e6
    assert json.loads((v5 / "config.json.orig").read_text())["rope_parameters"]["rope_theta"] == 8e6
    with pytest.raises(EvalError, match=r"rope_theta is 8e\+06 but --expect-rope-theta says 1\.28e\+08"):
        check_export(good, HELMET_LENGTHS, expect_rope_theta=1.28e8)
    short = fake_export(tmp_path / "short", tok_dir, max_position_embeddings=65536)
    with pytest.raises(EvalError, match=r"\[131072\] exceed the model's maximum of 65536"):
        check_export(short, HELMET_LENGTHS)
    assert check_export(short, [32768, 65536])["max_position_embeddings"] == 65536
    notok = fake_export(tmp_path / "notok", tok_dir)
    (notok / "tokenizer.json").unlink()
    (notok / "model.safetensors").unlink()
    with pytest.raises(EvalError) as e:
        check_export(notok, HELMET_LENGTHS)
    assert "no tokenizer.json or tokenizer.model" in str(e.value) and "no weights" in str(e.value)
    small = fake_export(tmp_path / "small", tok_dir, vocab_size=100)
    with pytest.raises(EvalError, match="tokens but config.json vocab_size is 100"):
        check_export(small, HELMET_LENGTHS)
    with pytest.raises(EvalError, match="no config.json"):
        check_export(tmp_path / "nothing", HELMET_LENGTHS)


def test_run_helmet_with_a_stand_in_checkout(tok_dir, tmp_path, capsys):
    export = fake_export(tmp_path / "export", tok_dir)
    helmet = tmp_path / "HELMET"
    helmet.mkdir()
    (helmet / "eval.py").write_text(
        "import json, os, sys\n"
        "with open(os.path.join(os.path.dirname(__file__), 'calls.jsonl'), 'a') as f:\n"
        "    f.write(json.dumps(sys.argv[1:]) + '\\n')\n")
    with pytest.raises(EvalError, match=r"HELMET data missing .*scripts/download_data.sh"):
        run_helmet(str(export), str(tmp_path / "out"), [32768], ["recall"], helmet_dir=str(helmet), python=sys.executable)
    for f in ("data/ruler/niah_multikey_2/validation_32768.jsonl", "data/ruler/niah_multikey_3/validation_32768.jsonl",
              "data/ruler/niah_multivalue/validation_32768.jsonl", "data/json_kv/test_k440_dep6.jsonl"):
        (helmet / f).parent.mkdir(parents=True, exist_ok=True)
        (helmet / f).write_text("{}\n")
    result = run_helmet(str(export), str(tmp_path / "out"), [32768], ["recall", "icl"], helmet_dir=str(helmet),
                        python=sys.executable, tag="t1")
    calls = [json.loads(x) for x in (helmet / "calls.jsonl").read_text().splitlines()]
    assert len(calls) == 2 and result["returncodes"] == [0, 0]
    assert calls[0][:2] == ["--config", str((tmp_path / "out" / "helmet_configs" / "recall_32k.yaml").resolve())]
    assert calls[0][calls[0].index("--model_name_or_path") + 1] == str(export.resolve())
    assert calls[0][calls[0].index("--tag") + 1] == "t1"
    cfg = yaml.safe_load((tmp_path / "out" / "helmet_configs" / "icl_32k.yaml").read_text())
    assert cfg["use_chat_template"] is False and cfg["shots"] == 0 and cfg["max_test_samples"] == 500
    assert "commands (run in" in capsys.readouterr().out
