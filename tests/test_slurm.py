"""slurm/*.sh on a real one-node SLURM cluster (munged + slurmctld + slurmd, DESIGN §7).

The GPU scripts run unmodified, with CPU overrides on the sbatch command line (`--nodes=1
--ntasks-per-node=2 --gpus-per-node=0`) and tiny recipes in the environment: pack.sh packs the tiny
data, the chain script runs stage 1 → stage 2 → SFT → convert with `--dependency=afterok`, and stage
1, preempted with `scancel --signal=USR1`, saves, requeues itself and resumes from the saved step.
Every job is followed by polling `scontrol show job`. One cluster serves the whole module (its tests
are one module: `pytest -n 2 --dist loadscope` keeps them on one worker; with plain `-n 2` each
worker starts its own cluster and they share the packed data); without root or apt they skip and say
why.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.slurm_cluster import BINARIES, FINAL_STATES, PACKAGES, SlurmCluster, SlurmUnavailable, apt_install
from tests.datasets import write_documents

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "slurm").glob("*.sh"))
TRAIN_SCRIPTS = ["stage1_64k.sh", "stage2_512k.sh", "sft.sh"]
CPU_TRAIN = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0"]  # the GPU defaults, overridden
N_STEPS = {"stage1": 8, "stage2": 2, "sft": 2}  # stage 1 long enough to be signalled mid-run
TINY = {s: f"train.steps={n} train.save_interval=0 logging.interval=1" for s, n in N_STEPS.items()}
HANG_S = 900  # a hang guard only (not a timing check): a loaded 2-core machine can be very slow
TOKENIZER = {"type": "synthetic", "path": "-", "sha256": "-", "vocab_size": 256, "eod_id": 0, "bos_id": None}


def skip_because(reason: str):
    """A skip, never a silent pass: the reason is in the short summary (`-ra` in pytest.ini)."""
    pytest.skip(f"SLURM tests skipped: {reason}")


# ---------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = None
    try:
        apt_install(PACKAGES, BINARIES)
        c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
        c.start()  # installed but not starting is a failure (ClusterError), not a skip
        yield c
    except SlurmUnavailable as e:
        skip_because(str(e))
    finally:
        if c is not None:
            c.stop()


def _write_docs(prefix: Path, docs: list[np.ndarray], masks=None) -> None:
    write_documents(prefix, docs, masks, tokenizer=TOKENIZER)


def write_tiny_docs(root: Path) -> None:
    """Document datasets named as examples/data/tiny_*.yaml expect (random tokens, EOD = 0)."""
    rng = np.random.default_rng(0)

    def docs(n, lo, hi):
        out = [rng.integers(1, 256, int(rng.integers(lo, hi))) for _ in range(n)]
        for d in out:
            d[-1] = 0
        return out

    _write_docs(root / "docs" / "long_docs", docs(80, 3000, 5000))
    _write_docs(root / "docs" / "medium_docs", docs(150, 500, 900))
    _write_docs(root / "docs" / "short_docs", docs(1000, 60, 250))
    chats = docs(300, 100, 600)
    _write_docs(root / "docs" / "chats_sft", chats,
                [np.r_[np.zeros(len(c) // 2, np.uint8), np.ones(len(c) - len(c) // 2, np.uint8)] for c in chats])


@contextlib.contextmanager
def session_lock(path: Path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def job_env(**extra) -> dict[str, str]:
    return {"MEGALONG_ROOT": str(ROOT), "MEGALONG_PYTHON": sys.executable, "WANDB_MODE": "disabled",
            "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra}


def finished_ok(cluster: SlurmCluster, job: int, timeout_s: float = HANG_S) -> tuple[dict, str]:
    info = cluster.wait(job, timeout_s)
    log = Path(info["StdOut"]).read_text(errors="replace") if Path(info.get("StdOut", "")).is_file() else ""
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", \
        f"job {job}: {info['JobState']} exit {info.get('ExitCode')}\n{cluster.job_log(info)}\n{cluster.log_tail()}"
    return info, log


# ---------------------------------------------------------------------------------------- static checks


def test_scripts_pass_bash_n_and_shellcheck():
    assert {p.name for p in SCRIPTS} >= {"common.sh", "launch.sh", "preprocess.sh", "pack.sh", "stage1_64k.sh",
                                         "stage2_512k.sh", "sft.sh", "convert_to_hf.sh", "eval.sh", "run_recipe.sh"}
    for script in SCRIPTS:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"bash -n {script.name}: {proc.stderr}"
    try:
        apt_install(["shellcheck"], ["shellcheck"])
    except SlurmUnavailable as e:
        skip_because(f"shellcheck: {e}")
    proc = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_scripts_document_their_environment():
    """Every variable a script reads with a default is named in its header comment or common.sh's."""
    common_header = (ROOT / "slurm" / "common.sh").read_text().split("\n\n")[0]
    docs = (ROOT / "docs" / "slurm.md").read_text()
    for script in SCRIPTS:
        text = script.read_text()
        header = "\n".join(ln for ln in text.splitlines() if ln.startswith("#"))
        for var in sorted(set(re.findall(r"\$\{([A-Z][A-Z0-9_]+)[:-]", text))):
            if var.startswith("SLURM_") or var in ("PYTHONPATH", "OMP_NUM_THREADS"):
                continue
            assert var in header or var in common_header, f"{script.name}: {var} is not documented at the top"
            assert var in docs, f"{var} ({script.name}) is not in docs/slurm.md"


# ---------------------------------------------------------------------------------------- on the cluster


def test_gpu_scripts_accept_cpu_overrides(cluster, tmp_path):
    """The unmodified #SBATCH lines (8 GPUs per node) with command-line overrides fit a CPU node."""
    for script in SCRIPTS:
        if script.name in ("common.sh", "launch.sh", "run_recipe.sh"):
            continue
        args = CPU_TRAIN if script.name in TRAIN_SCRIPTS else \
            ["--gpus-per-node=0"] if script.name == "eval.sh" else ["--cpus-per-task=1"]
        proc = subprocess.run(["sbatch", "--test-only", *args, f"--output={tmp_path}/%j.out", str(script)],
                              capture_output=True, text=True, env=cluster.env, cwd=tmp_path, timeout=60)
        assert proc.returncode == 0 and "to start at" in proc.stderr, f"{script.name}: {proc.stderr}"


def test_launcher_starts_a_two_process_gloo_group(cluster, tmp_path):
    """The one launcher (common.sh + launch.sh), srun mode, without the trainer: ranks, world size,
    local ranks, an all-reduce. (torchrun mode runs the trainer in the preemption test.)"""
    launcher = "srun"
    probe = tmp_path / "probe.py"
    probe.write_text("import os, torch, torch.distributed as dist\n"
                     "dist.init_process_group('gloo')\n"
                     "t = torch.tensor([dist.get_rank() + 1]); dist.all_reduce(t)\n"
                     "print(f\"rank {dist.get_rank()}/{dist.get_world_size()} local {os.environ['LOCAL_RANK']} "
                     "sum {int(t)}\", flush=True)\n")
    job_script = tmp_path / "probe.sh"
    job_script.write_text("#!/bin/bash\nset -euo pipefail\nsource \"$MEGALONG_ROOT/slurm/common.sh\"\n"
                          f"ml_header probe\nml_launch {probe}\n")
    job = cluster.sbatch(job_script, sbatch_args=["--nodes=1", "--ntasks-per-node=2", f"--output={tmp_path}/%j.out"],
                         env=job_env(MEGALONG_LAUNCHER=launcher), cwd=tmp_path)
    info, log = finished_ok(cluster, job)
    assert sorted(re.findall(r"^rank (\d)/2 local (\d) sum 3$", log, re.M)) == [("0", "0"), ("1", "1")], log
    assert f"job {job} " in log and f"nodes 1: {cluster.host}" in log
    assert re.search(rf"launch: {launcher}, 1 node\(s\) × 2 processes = 2; rendezvous {cluster.host}:\d+", log), log


def _steps_logged(metrics: Path) -> list[int]:
    return [json.loads(ln)["step"] for ln in metrics.read_text().splitlines()
            if ln.strip() and json.loads(ln).get("kind", "train") == "train"]


@pytest.fixture(scope="module")
def packed(cluster, tmp_path_factory) -> Path:
    """slurm/pack.sh as a job: the tiny data recipes → {data}/packed/{stage1,stage2,sft}.

    Made once per test session: under `pytest -n` a second worker (with its own cluster) waits for
    the first one's data instead of packing it again."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    root, ex = shared / "slurm_tiny_data", ROOT / "examples" / "data"
    with session_lock(shared / "slurm_tiny_data.lock"):
        if not (root / "packed.done").is_file():
            shutil.rmtree(root, ignore_errors=True)
            write_tiny_docs(root)
            env = job_env(DATA_ROOT=str(root), PACK_ARGS="--no-plot --quiet",
                          PACK_STAGES=" ".join(f"{s}={ex}/tiny_{s}.yaml" for s in ("stage1", "stage2", "sft")))
            job = cluster.sbatch(ROOT / "slurm" / "pack.sh", env=env, cwd=root,
                                 sbatch_args=["--cpus-per-task=1", f"--output={root}/%x-%j.out"])
            _, log = finished_ok(cluster, job)
            for s in ("stage1", "stage2", "sft"):
                assert f"pack {s}: {ex}/tiny_{s}.yaml (sources under {root}/docs) → {root}/packed/{s}" in log, log
            (root / "packed.done").write_text(str(job))
    for s in ("stage1", "stage2", "sft"):
        meta = json.loads((root / "packed" / f"{s}.meta.json").read_text())
        assert meta["stage"] == f"tiny-{s}-" + ("4k" if s == "stage2" else "1k"), meta["stage"]
    return root / "packed"


def wait_for_log_line(cluster: SlurmCluster, job: int, log_path: Path, pattern: str) -> None:
    """Polls the job's log every 0.1 s (and its state every second) until a line matches."""
    deadline, polls = time.monotonic() + HANG_S, 0
    while not re.search(pattern, log_path.read_text() if log_path.exists() else "", re.M):
        if polls % 10 == 0:
            info = cluster.job(job)
            assert info["JobState"] not in FINAL_STATES, f"{info}\n{cluster.job_log(info)}"
            assert time.monotonic() < deadline, f"no line {pattern!r} in the log\n{cluster.job_log(info)}"
        polls += 1
        time.sleep(0.1)


def test_recipe_chain_with_a_preempted_stage1(cluster, packed, tmp_path):
    """run_recipe.sh stage1 → stage2 → sft → convert (afterok), trainers under torchrun; stage 1 gets
    `scancel --signal=USR1` mid-run: it saves, requeues (same job id, so stage 2 keeps waiting) and
    resumes at the next step; each later stage starts from the previous one's final checkpoint."""
    ckpt, logs = tmp_path / "ckpt", tmp_path / "logs"
    logs.mkdir()
    ex = ROOT / "examples"
    cpu_train = " ".join(CPU_TRAIN)
    env = job_env(
        MEGALONG_LAUNCHER="torchrun", DATA_ROOT=str(packed.parent), CKPT_ROOT=str(ckpt),
        HF_OUT_DIR=str(tmp_path / "hf"), STAGE1_CONFIG=str(ex / "tiny_stage1.yaml"),
        STAGE2_CONFIG=str(ex / "tiny_stage2.yaml"), SFT_CONFIG=str(ex / "tiny_sft.yaml"),
        STAGE1_ARGS=TINY["stage1"], STAGE2_ARGS=TINY["stage2"], SFT_ARGS=TINY["sft"],
        RECIPE_SBATCH_ARGS=f"--output={logs}/%x-%j.out", RECIPE_SBATCH_ARGS_CONVERT="--cpus-per-task=1",
        RECIPE_SBATCH_ARGS_STAGE1=cpu_train, RECIPE_SBATCH_ARGS_STAGE2=cpu_train, RECIPE_SBATCH_ARGS_SFT=cpu_train)
    steps = ["stage1", "stage2", "sft", "convert"]
    proc = subprocess.run(["bash", str(ROOT / "slurm" / "run_recipe.sh"), *steps], capture_output=True, text=True,
                          env={**cluster.env, **env}, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    jobs = {step: int(job) for step, job in (line.split() for line in proc.stdout.splitlines())}
    assert list(jobs) == steps
    for prev, nxt in zip(steps, steps[1:]):
        assert cluster.job(jobs[nxt])["Dependency"] == f"afterok:{jobs[prev]}(unfulfilled)"

    stage1 = jobs["stage1"]
    wait_for_log_line(cluster, stage1, logs / f"megalong-stage1-{stage1}.out", r"^step 2/")
    cluster.cancel(stage1, "USR1")
    results = {s: finished_ok(cluster, jobs[s]) for s in steps}

    # stage 1: stopped on the signal, saved, requeued itself, resumed at the next step
    info, log = results["stage1"]
    save1, n1 = ckpt / "stage1_64k", N_STEPS["stage1"]
    assert info["Restarts"] == "1", info
    stopped = int(re.search(r"stopping after step (\d+)", log).group(1))
    assert 2 <= stopped < n1, log
    saved = save1 / f"iter_{stopped:07d}"
    assert json.loads((saved / "megalong.json").read_text())["run_state"]["reason"] == "preempted"
    assert f"requeueing job {stage1} (restart 1)" in log and f"job {stage1} name=megalong-stage1 restart=1" in log
    assert f"checkpoints {save1}: resuming from iter_{stopped:07d}" in log
    assert f"resumed from {saved} at step {stopped}" in log
    assert json.loads((save1 / "summary.json").read_text())["resumed_from"] == str(saved)
    assert log.count("launch: torchrun, 1 node(s) × 2 processes = 2") == 2, log

    for s, save in (("stage1", save1), ("stage2", ckpt / "stage2_512k"), ("sft", ckpt / "sft")):
        info, log = results[s]
        n = N_STEPS[s]
        summary = json.loads((save / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["final_step"] == n, summary
        assert (save / "latest").read_text().strip() == f"iter_{n:07d}"
        # every step trained exactly once, across the requeue too
        assert _steps_logged(save / "metrics.jsonl") == list(range(1, n + 1))
        # the log says which job, where, with what config, and where checkpoints and W&B files go
        assert f"job {info['JobId']} name=megalong-{s}" in log and f"nodes 1: {cluster.host}" in log
        assert "launch: torchrun, 1 node(s) × 2 processes = 2" in log and "TP1 × PP1 × CP1 × DP2" in log
        assert "# megalong.train resolved config" in log and f"save_dir: {save}" in log
        assert f"checkpoints {save}: none yet" in log and f"run files under {save}/wandb" in log
        # the tiny recipes name no packed held-out data here, so the scripts turned evaluation off
        assert f"no held-out dataset at {packed}/{s}_heldout: evaluation off" in log
    # each stage starts from the previous stage's final checkpoint (weights only)
    assert f"initialised weights from {save1 / f'iter_{n1:07d}'}" in results["stage2"][1]
    assert f"initialised weights from {ckpt / 'stage2_512k' / 'iter_0000002'}" in results["sft"][1]
    hf = tmp_path / "hf"
    config = json.loads((hf / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["rope_theta"] == pytest.approx(1.28e8)
    assert list(hf.glob("*.safetensors")), sorted(p.name for p in hf.iterdir())
