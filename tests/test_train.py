"""The trainer end to end on CPU (gloo): learning, stages, loss-mode exactness under any batch layout,
bit-exact resume after SIGKILL, crash-safe saves, resharding on resume, signals, NaN handling.

Process launches cost 5–9 s of imports each, so one 2-process launch runs many stages in-process
(tests/workers/train_runs.py "dp"), one 1-process launch the single-process references ("single"),
and three more launches do what needs fresh processes: a crash mid-save, the CLI resume after it, and
preemption signals sent to srun-style processes.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launch import ROOT, free_port, torchrun
from tests.workers.train_data import make_datasets
from tests.workers.train_runs import stage1

WORKER = Path(__file__).parent / "workers" / "train_runs.py"
FAULT = Path(__file__).parent / "workers" / "train_fault.py"
TOL = 1e-5


def once(tmp_path_factory, name: str, produce):
    """Runs `produce(dir)` once per test session even under pytest-xdist (workers share the parent of
    their base temp dir; a file lock makes the others wait and reuse the result)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "megalong_train"
    root.mkdir(exist_ok=True)
    with FileLock(str(root / f"{name}.lock")):
        done = root / f"{name}.done.json"
        if not done.is_file():
            done.write_text(json.dumps(produce(root)))
        return json.loads(done.read_text())


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    def produce(root):
        make_datasets(root / "data")
        (root / "out").mkdir(exist_ok=True)
        return str(root)
    return Path(once(tmp_path_factory, "data", produce))


def _suite(tmp_path_factory, work, name, nproc):
    def produce(root):
        proc = torchrun(WORKER, nproc, [name, work / "data", work / "out"], timeout=600)
        return [json.loads((work / "out" / f"{name}.json").read_text()), proc.stdout]
    return once(tmp_path_factory, name, produce)


@pytest.fixture(scope="module")
def dp(tmp_path_factory, work):
    return _suite(tmp_path_factory, work, "dp", 2)


@pytest.fixture(scope="module")
def single(tmp_path_factory, work):
    return _suite(tmp_path_factory, work, "single", 1)[0]


def losses(run, key="loss"):
    return {r["step"]: r[key] for r in run["train"]}


# ------------------------------------------------------------------------------------------ learning


def test_tiny_stage1_learns_and_evaluates_by_position(dp):
    ref = dp[0]["ref"]
    assert ref["code"] == 0 and ref["summary"]["status"] == "completed" and ref["summary"]["final_step"] == 12
    loss = [r["loss"] for r in ref["train"]]
    assert len(loss) == 12 and sum(loss[-3:]) / 3 < sum(loss[:3]) / 3 - 0.4, loss
    evals = {e["step"]: e for e in ref["eval"]}
    assert sorted(evals) == [6, 12] and evals[12]["loss"] < evals[6]["loss"]
    buckets = evals[12]["position_losses"]
    assert list(buckets) == [f"{16 * i}-{16 * (i + 1)}" for i in range(8)]  # 128 tokens / 8 buckets
    assert all(3.0 < v < 6.0 for v in buckets.values())
    first = ref["train"][0]
    assert first["tokens_per_s"] > 0 and first["l_eff"] > 1 and first["memory_gib"] > 0 and first["lr"] == 0.0


def test_stage2_starts_from_stage1_weights_with_longer_sequences_and_new_rope(dp, work):
    s2 = dp[0]["stage2"]
    assert s2["code"] == 0
    cfg = (work / "out" / "stage2" / "config.yaml").read_text()
    assert "seq_length: 256" in cfg and "rope_base: 128000000.0" in cfg
    meta = json.loads((work / "out" / "stage2" / "iter_0000002" / "megalong.json").read_text())
    assert meta["model"]["rope_base"] == 1.28e8 and meta["config"]["train"]["stage"] == "tiny-stage2"
    # the first step already has stage 1's knowledge (a fresh model starts at ~ln 256 = 5.55)
    assert s2["train"][0]["loss"] < dp[0]["ref"]["train"][0]["loss"] - 0.3
    assert s2["train"][0]["lr"] == pytest.approx(1.5e-3)  # fresh schedule, no warmup step at 2 steps


def test_sft_trains_on_answers_only(dp):
    sft = dp[0]["sft"]
    assert sft["code"] == 0
    targets = sft["probe"]  # Σ target mask of global batch 0, counted from the dataset
    assert sft["train"][0]["weight_sum"] == targets
    assert 0 < targets < 0.5 * 8 * 128  # prompts and padding are not targets


# ------------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_loss_is_identical_for_any_batch_layout(dp, single, mode):
    """One global batch of 8 samples: 1 process × 8 micro-batches (reference), 1 × 4 micro-batches of
    2 (token), DP2 × 4, CP2 × 8 — same losses and gradient norms over 3 steps (so the same updates)."""
    ref = single[f"{mode}_1x8"]
    others = [dp[0][f"{mode}_dp2"], dp[0][f"{mode}_cp2"]] + ([single["token_2x4"]] if mode == "token" else [])
    for run in others:
        assert run["code"] == 0
        for key in ("loss", "grad_norm", "weight_sum"):
            a, b = losses(ref, key), losses(run, key)
            assert sorted(a) == sorted(b) == [1, 2, 3]
            assert all(abs(a[s] - b[s]) <= TOL * max(1.0, abs(a[s])) for s in a), (key, a, b)


def test_sequence_mode_is_the_mean_of_per_document_losses(single):
    """L = (1/M) Σ_i L_i/N_i over the M documents of the global batch, computed in the worker from
    plain per-token CE and the raw target masks — and it is not the token-mode loss."""
    seq = single["sequence_1x8"]
    assert abs(seq["train"][0]["loss"] - seq["probe"]) < TOL
    assert abs(seq["train"][0]["loss"] - single["token_1x8"]["train"][0]["loss"]) > 1e-4
    assert seq["train"][0]["weight_sum"] == pytest.approx(round(seq["train"][0]["weight_sum"]), abs=1e-5)  # = M


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_resume_under_another_layout_continues_the_run(dp, layout):
    """Checkpoint written at TP1×DP2 (distributed optimizer), resumed at TP2 or PP2 from step 8."""
    ref, run = losses(dp[0]["ref"]), losses(dp[0][layout])
    assert sorted(run) == [9, 10, 11, 12]
    assert all(abs(run[s] - ref[s]) < TOL for s in run), (ref, run)
    ref_eval, run_eval = dp[0]["ref"]["eval"][-1], dp[0][layout]["eval"][-1]
    assert run_eval["step"] == 12 and abs(run_eval["loss"] - ref_eval["loss"]) < TOL
    assert dp[0][layout]["summary"]["resumed_from"].endswith("ref/iter_0000008")


# ------------------------------------------------------------------------------------------ faults


def _recipe_args(work, save_dir, *extra):
    recipe, overrides = stage1(work / "data", work / "out", save_dir, "train.steps=12", "train.save_interval=4",
                               "train.keep_last=0", "eval.interval=6", *extra)
    return ["--config", recipe, *overrides]


@pytest.fixture(scope="module")
def crashed(tmp_path_factory, work, dp):
    """The ref run again, killed (SIGKILL, every rank) in the middle of its step-8 save; then the same
    command through the CLI (wandb offline on) resumes it."""
    save_dir = work / "out" / "crash"

    def produce(root):
        crash = torchrun(FAULT, 2, ["8", *_recipe_args(work, "crash")], timeout=600, check=False)
        after_crash = {"code": crash.returncode, "stdout": crash.stdout,
                       "latest": (save_dir / "latest").read_text().strip(),
                       "dirs": sorted(p.name for p in save_dir.glob("iter_*"))}
        resume = torchrun("-m", 2, ["megalong.train", *_recipe_args(work, "crash", "logging.wandb=true")],
                          timeout=600, env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
        records = [json.loads(x) for x in (save_dir / "metrics.jsonl").read_text().splitlines()]
        return [after_crash, resume.stdout, records]

    after_crash, stdout, records = once(tmp_path_factory, "crash", produce)
    return after_crash, stdout, records, save_dir


def test_crash_mid_save_leaves_the_previous_checkpoint_in_charge(crashed):
    after_crash, _, _, _ = crashed
    assert after_crash["code"] != 0 and "FAULT: SIGKILL" in after_crash["stdout"]
    assert after_crash["latest"] == "iter_0000004"
    assert after_crash["dirs"] == ["iter_0000004", "iter_0000008.tmp"]


def test_resume_after_sigkill_reproduces_the_uninterrupted_run_bit_for_bit(crashed, dp):
    _, stdout, records, save_dir = crashed
    assert "resumed from" in stdout and "iter_0000004 at step 4" in stdout
    last = {}
    for r in records:  # the crashed run logged steps 1..8; the resumed run 5..12 (later lines win)
        last[(r["kind"], r["step"])] = r
    ref = {(r["kind"], r["step"]): r for r in dp[0]["ref"]["train"] + dp[0]["ref"]["eval"]}
    assert sorted(last) == sorted(ref)
    for key, r in ref.items():
        assert last[key]["loss"] == r["loss"], key  # bit for bit
        if key[0] == "train":
            assert last[key]["grad_norm"] == r["grad_norm"] and last[key]["lr"] == r["lr"], key
    assert (save_dir / "latest").read_text().strip() == "iter_0000012"
    assert not (save_dir / "iter_0000008.tmp").exists()


def test_cli_run_writes_summary_config_and_offline_wandb(crashed):
    _, stdout, _, save_dir = crashed
    summary = json.loads((save_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["exit_code"] == 0 and summary["final_step"] == 12
    assert summary["checkpoint"].endswith("iter_0000012") and summary["resumed_from"].endswith("iter_0000004")
    assert summary["tokens_per_s"] > 0 and summary["last_loss"] is not None
    assert Path(summary["wandb_dir"]).is_dir() and Path(summary["wandb_dir"]).name.startswith("offline-run-")
    assert str(save_dir) in summary["wandb_dir"] and "wandb sync" in stdout
    assert "# megalong.train resolved config" in stdout and f"→ {save_dir}" in stdout
    meta = json.loads((save_dir / "iter_0000012" / "megalong.json").read_text())
    assert meta["config"]["train"]["save_dir"] == str(save_dir) and meta["run_state"]["consumed_samples"] == 96
    assert meta["run_state"]["data"]["per_dataset"] == {str(save_dir.parents[1] / "data" / "stage1"): 96}


def test_sigterm_and_sigusr1_finish_the_step_save_and_exit_zero(work):
    """srun-style: two plain processes; SIGUSR1 (SLURM --signal) to rank 1 and SIGTERM to rank 0 only
    after training started — both ranks agree, finish the same step, save, exit 0."""
    save_dir = work / "out" / "signals"
    args = _recipe_args(work, "signals", "train.steps=100000", "train.save_interval=0", "eval.datasets=[]")
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs.append(subprocess.Popen([sys.executable, "-m", "megalong.train", *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        deadline = time.time() + 300
        metrics = save_dir / "metrics.jsonl"
        while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            assert all(p.poll() is None for p in procs), procs[0].communicate()[0][-3000:]
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGUSR1)
        procs[0].send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:]
    summary = json.loads((save_dir / "summary.json").read_text())
    assert summary["status"] == "preempted" and 3 <= summary["final_step"] < 100000
    assert (save_dir / f"iter_{summary['final_step']:07d}" / "megalong.json").is_file()
    assert (save_dir / "latest").read_text().strip() == f"iter_{summary['final_step']:07d}"
    assert "received: stopping after step" in outs[0]


def test_nan_stops_with_the_last_good_checkpoint_or_skips(dp, single):
    stop, stdout = dp[0]["nan_stop"], dp[1]
    assert stop["code"] == 3 and stop["summary"]["status"] == "nan" and stop["summary"]["final_step"] == 2
    assert "non-finite gradient (loss" in stdout and "at step 2" in stdout
    assert "Last good checkpoint: " in stdout and "nan_stop/iter_0000001" in stdout
    skip = single["nan_skip"]
    assert skip["code"] == 0 and skip["summary"]["status"] == "completed"
    assert [r["skipped"] for r in skip["train"]] == [False, True, True]


def test_time_limit_saves_and_exits_with_the_configured_code(single, work):
    run = single["time_limit"]
    assert run["code"] == 75 and run["summary"]["status"] == "time_limit" and run["summary"]["final_step"] == 1
    assert (work / "out" / "time_limit" / "iter_0000001" / "megalong.json").is_file()


def test_longalign_sorted_batching_variant_runs(single):
    run = single["sorted"]
    assert run["code"] == 0 and len(run["train"]) == 2
    assert all(r["loss"] == r["loss"] and 0 < r["weight_sum"] for r in run["train"])
