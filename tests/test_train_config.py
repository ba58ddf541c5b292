"""The trainer's config, in-process and fast: recipes, batch arithmetic, one-line errors, the
generated configuration reference, the signal flags."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from megalong.config import dump_yaml
from megalong.train.__main__ import main
from megalong.train.config import load_run_config, plan_run, resolve_model
from megalong.train.signals import StopSignals, agree
from tests.workers.train_data import make_datasets

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_datasets(tmp_path_factory.mktemp("cfgdata"))


# ------------------------------------------------------------------------------------------ recipes

# recipe: (world size to plan for, expected steps, RoPE base, LR, seq length, global batch in samples)
FULL = {
    "prolong_stage1_64k.yaml": (16, 5000, 8e6, 1e-5, 65536, 64),
    "prolong_stage2_512k.yaml": (32, 2500, 1.28e8, 5e-6, 524288, 16),
    "prolong_sft_64k.yaml": (16, 239, 1.28e8, 2e-5, 65536, 64),
    "longalign_sft_64k.yaml": (16, 600, 5e5, 2e-5, 65536, 8),
    "longalign_sorted_64k.yaml": (16, 600, 5e5, 2e-5, None, 64),
}


@pytest.mark.parametrize("name", sorted(FULL))
def test_full_size_recipes_have_the_papers_numbers(name):
    world, steps, rope, lr, S, G = FULL[name]
    cfg = load_run_config(EXAMPLES / name)
    plan = plan_run(cfg, world_size=world, check_data=False)
    assert (plan.steps, plan.model.rope_base, cfg.optim.lr, plan.seq_length, plan.global_batch_size) == \
        (steps, rope, lr, S, G)
    assert plan.model.name == "llama3_8b" and plan.model.params_dtype == "bfloat16"
    assert (cfg.optim.weight_decay, cfg.optim.beta1, cfg.optim.beta2) == (0.1, 0.9, 0.95)
    assert cfg.optim.min_lr == pytest.approx(lr / 10)
    assert cfg.optim.warmup_fraction == (0.1 if "stage" in name else 0.05)
    assert cfg.data.loss_mode == ("sequence" if name == "longalign_sft_64k.yaml" else "token")
    if S:
        assert plan.tokens_per_step == {65536: 4 * 2**20, 524288: 8 * 2**20}[S] or name.startswith("longalign")


@pytest.mark.parametrize("name", ["tiny_stage1.yaml", "tiny_stage2.yaml", "tiny_sft.yaml", "tiny_longalign_sft.yaml"])
def test_tiny_recipes_plan_on_two_processes(name, data):
    key = {"tiny_stage1.yaml": "stage1", "tiny_stage2.yaml": "stage2"}.get(name, "sft")
    cfg = load_run_config(EXAMPLES / name, [f"data.datasets=[{{path: {data[key]}}}]", "eval.datasets=[]"])
    plan = plan_run(cfg, world_size=2)
    assert plan.model.name == "tiny" and plan.model.params_dtype == "float32" and plan.steps <= 40
    assert plan.dp == 2 and plan.num_micro_batches * 2 * plan.micro_batch_size == plan.global_batch_size
    assert plan.seq_length == {"stage2": 256}.get(key, 128)  # read from the pack's meta


def test_model_section_is_a_preset_plus_overrides_and_round_trips(tmp_path):
    cfg = load_run_config(EXAMPLES / "prolong_stage1_64k.yaml", ["model.recompute=selective"])
    m = resolve_model(cfg.model)
    assert (m.num_layers, m.hidden_size, m.rope_base, m.recompute) == (32, 4096, 8e6, "selective")
    (tmp_path / "resolved.yaml").write_text(dump_yaml(cfg))  # what checkpoints and config.yaml record
    again = load_run_config(tmp_path / "resolved.yaml")
    assert resolve_model(again.model) == m and dump_yaml(again) == dump_yaml(cfg)
    full = load_run_config(None, ["model.num_layers=3", "model.hidden_size=32"])
    assert resolve_model(full.model).num_layers == 3 and full.model.preset is None


def test_batch_in_tokens_and_stage_length_in_tokens(data):
    base = [f"data.datasets=[{{path: {data['stage1']}}}]", "eval.datasets=[]", "train.steps=null"]
    cfg = load_run_config(EXAMPLES / "tiny_stage1.yaml",
                          base + ["train.global_batch_size=null", "train.global_batch_tokens=1K", "train.total_tokens=10000"])
    plan = plan_run(cfg, world_size=2)
    assert plan.global_batch_size == 8 and plan.steps == 10  # ceil(10000 / 1024)


# ------------------------------------------------------------------------------------------ errors


def _error(capsys, monkeypatch, world, *overrides, recipe="tiny_stage1.yaml", data=None):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.delenv("RANK", raising=False)
    extra = [f"data.datasets=[{{path: {data['stage1']}}}]", "eval.datasets=[]"] if data else []
    code = main(["--config", str(EXAMPLES / recipe), *extra, *overrides])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("megalong.train: error: ") and err.count("\n") == 1, err
    return err


def test_bad_configs_give_one_line_errors_naming_the_fix(capsys, monkeypatch, data):
    err = _error(capsys, monkeypatch, 1, "trian.steps=3", data=data)
    assert "unknown key 'trian'" in err and "did you mean 'train'" in err
    err = _error(capsys, monkeypatch, 1, "model.rope_bse=1e6", data=data)
    assert "did you mean 'rope_base'" in err
    err = _error(capsys, monkeypatch, 2, "train.global_batch_size=3", data=data)
    assert "global batch of 3 samples is not divisible by train.micro_batch_size × DP = 1 × 2" in err
    err = _error(capsys, monkeypatch, 1, "train.global_batch_size=null", "train.global_batch_tokens=1000", data=data)
    assert "not a positive multiple of the sequence length 128" in err and "1024" in err
    err = _error(capsys, monkeypatch, 3, "parallel.context_parallel=3", data=data)
    assert "sequence length 128 is not divisible by 2·CP = 6" in err
    err = _error(capsys, monkeypatch, 1, "data.datasets=[{path: /nonexistent/stage1}]", "eval.datasets=[]")
    assert "data.datasets[0].path: no dataset at '/nonexistent/stage1'" in err and "pack_dataset" in err
    err = _error(capsys, monkeypatch, 4, "parallel.tensor_parallel=8", data=data)
    assert "not divisible by TP×PP×CP" in err
    err = _error(capsys, monkeypatch, 2, "parallel.tensor_parallel=2", "model.num_attention_heads=3",
                 "model.num_kv_heads=3", "model.head_dim=16", data=data)
    assert "num_attention_heads=3 is not divisible by tensor parallel size 2" in err


def test_cli_error_is_one_line_without_traceback(data):
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "megalong.train", "--config", str(EXAMPLES / "tiny_stage1.yaml"),
                           "train.global_batch_size=7", f"data.datasets=[{{path: {data['stage1']}}}]",
                           "eval.datasets=[]", "train.micro_batch_size=2"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "micro_batch_size × DP = 2 × 1" in proc.stderr


# ------------------------------------------------------------------------------------------ docs, signals


def test_configuration_reference_is_generated_from_the_dataclasses():
    spec = importlib.util.spec_from_file_location("gen_config_docs", ROOT / "tools" / "gen_config_docs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == gen.render(), "docs/configuration.md is stale: run python tools/gen_config_docs.py"
    for key in ("train.init_from", "train.resume", "data.loss_mode", "eval.position_buckets", "model.preset"):
        assert f"`{key}`" in committed


def test_stop_signals_are_flags_not_deaths():
    flags = StopSignals()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert flags.received == "SIGUSR1"  # the first one is reported
    finally:
        flags.restore()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))
    assert agree([False, True, False]) == [False, True, False]  # no process group: local flags


def test_logging_without_wandb_says_so_once_and_writes_jsonl(tmp_path, monkeypatch, capsys):
    from megalong.train.config import LoggingConfig
    from megalong.train.logger import MetricsLogger

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb → ImportError
    log = MetricsLogger(LoggingConfig(jsonl=True, wandb=True), tmp_path, {}, "s1", active=True)
    record = {"step": 1, "steps": 2, "stage": "s1", "loss": 4.5, "lr": 1e-3, "grad_norm": 0.5,
              "tokens_per_s": 1000.0, "mfu": None, "l_eff": 100.0, "memory_gib": 0.1, "step_time_s": 0.2}
    log.log(record)
    log.log({"step": 1, "loss": 4.4, "tokens": 512, "position_losses": {"0-64": 4.6, "64-128": 4.2}}, kind="eval")
    out = capsys.readouterr().out
    assert out.count("wandb is not installed") == 1 and log.wandb_run is None
    assert "step 1/2 | s1 | loss 4.5000 | lr 1.00e-03 | grad 0.500 | 1,000 tok/s" in out
    assert "by position 0-64 4.600 64-128 4.200" in out
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["kind"] for x in lines] == ["train", "eval"]
