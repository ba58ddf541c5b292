"""A real one-node SLURM cluster for tests: munged, slurmctld and slurmd started under a temp dir.

Debian 12's packages (SLURM 22.05) run without systemd (DESIGN §7). Everything the cluster writes
(munge key and socket, slurm.conf, state, spool, logs, PID files) lives under one directory, on
ports picked free at start, so it never touches a system SLURM or munge. Teardown cancels the jobs
first (killing slurmd leaves them running), then stops only the daemons this harness started, by
the PID files they wrote. Jobs are followed by polling `scontrol show job` (`sbatch --wait` polls
slowly and calls a job cancelled while pending a success).
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional

from megalong.runtime.distributed import free_port

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo", "munged", "mungekey"]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
HOSTS_TAG = "# added by megalong tests/slurm_cluster.py"


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be installed here (not root, no apt); the message says why (tests skip with it)."""


class ClusterError(RuntimeError):
    """SLURM is installed but the cluster did not come up: a failure, with the daemons' logs."""


SBIN_PATH = "/usr/sbin:/sbin"  # the daemons, mungekey and runuser live there; a CI PATH may lack it


def _path_env() -> dict[str, str]:
    return dict(os.environ, PATH=f"{os.environ.get('PATH', '/usr/bin:/bin')}:{SBIN_PATH}")


def _which_all(names: Iterable[str]) -> list[str]:
    """The names not found on PATH + /usr/sbin:/sbin."""
    path = _path_env()["PATH"]
    return [n for n in names if shutil.which(n, path=path) is None]


def apt_install(packages: list[str], binaries: list[str]) -> None:
    """Installs Debian packages unless their binaries are present; SlurmUnavailable says why not.

    A temporary policy-rc.d keeps the packages' init scripts from starting system daemons that
    nothing here would stop.
    """
    if not _which_all(binaries):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"{', '.join(packages)} not installed and not root (cannot apt-get install)")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"{', '.join(packages)} not installed and no apt-get on this machine")
    env = dict(_path_env(), DEBIAN_FRONTEND="noninteractive")
    policy = Path("/usr/sbin/policy-rc.d")
    wrote_policy = not policy.exists()
    if wrote_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        if proc.returncode != 0:  # stale or missing package lists: refresh once and retry
            subprocess.run(["apt-get", "update", "-q", "-o", "Acquire::http::Timeout=20", "-o", "Acquire::Retries=0"],
                           capture_output=True, text=True, env=env, timeout=180)
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        if proc.returncode != 0:
            raise SlurmUnavailable(f"apt-get install {' '.join(packages)} failed ({proc.returncode}): "
                                   f"{(proc.stderr or proc.stdout).strip()[-500:]}")
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SlurmUnavailable(f"apt-get install {' '.join(packages)} failed: {e}") from e
    finally:
        if wrote_policy:
            policy.unlink(missing_ok=True)
    missing = _which_all(binaries)
    if missing:
        raise SlurmUnavailable(f"installed {' '.join(packages)} but {', '.join(missing)} still missing")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has exited; its (lost) parent just never reaped it


def _mem_total_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise SlurmUnavailable("cannot read MemTotal from /proc/meminfo")


def parse_scontrol(text: str) -> dict[str, str]:
    """`scontrol show job -o` (one line of Key=Value pairs) → dict; values may not contain spaces
    except Command/WorkDir-like trailing keys, which we do not need."""
    out: dict[str, str] = {}
    for token in text.split():
        key, sep, value = token.partition("=")
        if sep:
            out[key] = value
    return out


class SlurmCluster:
    """One node, one partition (`debug`), everything under `root`. Use `start()` and `stop()`."""

    def __init__(self, root: Path, cred_expire_s: int = 5):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        # munged (user munge) must reach its files: not under pytest's root-only (0700) temp tree
        self.munge_dir = Path(tempfile.mkdtemp(prefix="megalong-munge-"))
        self.socket = self.munge_dir / "munge.socket"
        # A requeued job may start again only after the step credential lifetime (default 120 s).
        self.cred_expire_s = cred_expire_s
        self.pid_files = {"slurmd": self.root / "slurmd.pid", "slurmctld": self.root / "slurmctld.pid",
                          "munged": self.munge_dir / "munged.pid"}
        self.added_hosts_line: Optional[str] = None

    # ---- environment -------------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """Environment for clients (sbatch, scontrol) and, through sbatch, for jobs."""
        return dict(_path_env(), SLURM_CONF=str(self.conf))

    def _ensure_hostname_resolves(self) -> None:
        """torchrun's rendezvous on the SLURM host name hangs when the name does not resolve."""
        try:
            socket.gethostbyname(self.host)
            return
        except OSError:
            pass
        line = f"127.0.0.1 {self.host} {HOSTS_TAG}\n"
        with open("/etc/hosts", "a") as f:
            f.write(line)
        self.added_hosts_line = line

    def _restore_hosts(self) -> None:
        if self.added_hosts_line is None:
            return
        hosts = Path("/etc/hosts")
        lines = hosts.read_text().splitlines(keepends=True)
        hosts.write_text("".join(ln for ln in lines if ln != self.added_hosts_line))
        self.added_hosts_line = None

    # ---- start -------------------------------------------------------------------------------
    def write_conf(self, slurmctld_port: int, slurmd_port: int) -> None:
        mem = max(_mem_total_mb() - 1024, 512)
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"""\
ClusterName=megalongtest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={slurmctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket},cred_expire={self.cred_expire_s}
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool
SlurmctldPidFile={self.pid_files['slurmctld']}
SlurmdPidFile={self.pid_files['slurmd']}
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
EnforcePartLimits=ALL
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={mem} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
""")

    def _start_munge(self) -> None:
        key = self.munge_dir / "munge.key"
        self._run(["mungekey", "--create", f"--keyfile={key}"], "mungekey")
        shutil.chown(self.munge_dir, "munge", "munge")
        shutil.chown(key, "munge", "munge")
        self.munge_dir.chmod(0o755)
        self._run(["runuser", "-u", "munge", "--", "munged", f"--key-file={key}", f"--socket={self.socket}",
                   f"--pid-file={self.pid_files['munged']}", f"--log-file={self.munge_dir}/munged.log",
                   f"--seed-file={self.munge_dir}/munged.seed"], "munged")

    def _run(self, cmd: list[str], what: str) -> None:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=60)
        if proc.returncode != 0:
            raise ClusterError(f"{what} failed to start ({proc.returncode}): "
                                   f"{(proc.stderr or proc.stdout).strip()[-600:]}\n{self.log_tail()}")

    def start(self, timeout_s: float = 60) -> "SlurmCluster":
        """Starts munged, slurmctld and slurmd; on failure call `stop()` to end what did start."""
        if os.geteuid() != 0:
            raise SlurmUnavailable("starting slurmctld/slurmd/munged needs root")
        self.root.mkdir(parents=True, exist_ok=True)
        self._ensure_hostname_resolves()
        self.write_conf(free_port(), free_port())
        self._start_munge()
        self._run(["slurmctld", "-f", str(self.conf)], "slurmctld")
        self._run(["slurmd", "-f", str(self.conf), "-N", self.host], "slurmd")
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, env=self.env)
            state = proc.stdout.strip()
            if state == "idle":
                return self
            time.sleep(0.2)
        raise ClusterError(f"node did not become idle within {timeout_s:.0f} s (state {state!r})\n"
                               f"{self.log_tail()}")

    # ---- jobs --------------------------------------------------------------------------------
    def sbatch(self, script: str | Path, *args: str, sbatch_args: Iterable[str] = (),
               env: Optional[dict[str, str]] = None, cwd: Optional[Path] = None) -> int:
        cmd = ["sbatch", "--parsable", *sbatch_args, str(script), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**self.env, **(env or {})},
                              cwd=cwd, timeout=60)
        if proc.returncode != 0:
            raise AssertionError(f"{shlex.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job`; a failed query (a busy slurmctld times out) reads as state UNKNOWN."""
        try:
            proc = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                                  env=self.env, timeout=30)
        except subprocess.TimeoutExpired:
            return {"JobState": "UNKNOWN", "error": "scontrol timed out"}
        if proc.returncode != 0:
            return {"JobState": "UNKNOWN", "error": proc.stderr.strip()}
        return parse_scontrol(proc.stdout)

    def wait(self, job_id: int, timeout_s: float = 240, until: Optional[set[str]] = None,
             poll_s: float = 1.0) -> dict[str, str]:
        """Polls until the job reaches a state in `until` (default: any final state)."""
        until = until or FINAL_STATES
        deadline = time.monotonic() + timeout_s
        info = self.job(job_id)
        while info.get("JobState") not in until:
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {info.get('JobState')} ({info.get('Reason')}) after "
                                     f"{timeout_s:.0f} s\n{self.job_log(info)}\n{self.log_tail()}")
            time.sleep(poll_s)
            info = self.job(job_id)
        return info

    def cancel(self, job_id: int, signal_name: Optional[str] = None) -> None:
        cmd = ["scancel", *( [f"--signal={signal_name}"] if signal_name else []), str(job_id)]
        subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=30, check=True)

    @staticmethod
    def job_log(info: dict[str, str], tail: int = 6000) -> str:
        path = Path(info.get("StdOut", ""))
        if not path.is_file():
            return f"(no job output at {path})"
        return f"--- {path} ---\n{path.read_text(errors='replace')[-tail:]}"

    def log_tail(self, tail: int = 3000) -> str:
        parts = []
        for p in (self.root / "log" / "slurmctld.log", self.root / "log" / "slurmd.log",
                  self.munge_dir / "munged.log"):
            name = p.name
            if p.is_file():
                parts.append(f"--- {name} ---\n{p.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    # ---- teardown ----------------------------------------------------------------------------
    def stop(self, timeout_s: float = 20) -> None:
        """Cancels every job, waits for them to leave the node, then stops our daemons by PID file."""
        try:
            if self.conf.exists() and self.pid_files["slurmctld"].exists():
                q = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True,
                                   env=self.env, timeout=30)
                jobs = q.stdout.split()
                if jobs:
                    subprocess.run(["scancel", *jobs], capture_output=True, env=self.env, timeout=30)
                deadline = time.monotonic() + timeout_s
                while jobs and time.monotonic() < deadline:
                    q = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%T"], capture_output=True,
                                       text=True, env=self.env, timeout=30)
                    if not set(q.stdout.split()) & {"RUNNING", "COMPLETING", "PENDING", "CONFIGURING",
                                                   "REQUEUED", "SUSPENDED"}:
                        break
                    time.sleep(0.3)
        finally:
            for name in ("slurmd", "slurmctld", "munged"):
                self._stop_pid_file(self.pid_files[name], name, timeout_s)
            self._restore_hosts()
            shutil.rmtree(self.munge_dir, ignore_errors=True)

    @staticmethod
    def _stop_pid_file(pid_file: Path, name: str, timeout_s: float) -> None:
        try:
            pid = int(pid_file.read_text().strip())
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except (OSError, ValueError):
            return
        if comm != name or not _alive(pid):  # gone, or the number now belongs to someone else
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
