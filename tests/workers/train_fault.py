"""`python -m megalong.train` with a crash injected in the middle of one checkpoint save: every rank
SIGKILLs itself right after dist_checkpointing has written `iter_{N}.tmp` and before the rename and
the `latest` pointer move (what a node failure or the OOM killer would do).

    torchrun --nproc-per-node 2 tests/workers/train_fault.py CRASH_STEP --config RECIPE [key=value ...]
"""
import os
import signal
import sys


def main():
    crash_step, argv = int(sys.argv[1]), sys.argv[2:]
    from megatron.core import dist_checkpointing

    real_save = dist_checkpointing.save

    def save(state, path, *args, **kwargs):
        out = real_save(state, path, *args, **kwargs)
        if str(path).rstrip("/").endswith(f"iter_{crash_step:07d}.tmp"):
            print(f"FAULT: SIGKILL in the middle of saving {path}", flush=True)
            # like a node failure or SLURM's cgroup kill, take the checkpoint writer's helper
            # processes down too (orphans would keep the launcher's output pipes open)
            import psutil

            for child in psutil.Process().children(recursive=True):
                child.kill()
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    dist_checkpointing.save = save
    from megalong.train.__main__ import main as train_main

    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
