"""Peak memory and time of checkpoint conversion, both directions, on a random Llama-3.2-1B-shaped model.

    .venv/bin/python benchmarks/convert_memory.py --json convert_memory.json

Writes a random HF checkpoint (safetensors, streamed), then runs tools/convert_checkpoint.py
hf-to-megalong and megalong-to-hf as a user would, sampling the memory of the whole process tree
(the tool, megatron's checkpoint-writer helpers) every 50 ms. Memory is PSS (proportional set size:
pages shared between forked writers are counted once), summed over the tree; the main process's RSS
is reported too. Finally checks the round trip is bit-identical, tensor by tensor.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GIB = 2**30


def tree_memory(pid: int) -> tuple[int, int]:
    """(Σ PSS over the process tree, RSS of `pid`) in bytes; 0s once it is gone."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
        rss = root.memory_info().rss
    except psutil.Error:
        return 0, 0
    pss = 0
    for p in procs:
        try:
            for line in Path(f"/proc/{p.pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
                    break
        except OSError:
            pass
    return pss, rss


def run_measured(cmd: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"pss": 0, "rss": 0}

    def sample():
        while proc.poll() is None:
            pss, rss = tree_memory(proc.pid)
            peak["pss"], peak["rss"] = max(peak["pss"], pss), max(peak["rss"], rss)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = proc.communicate()[0]
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out[-4000:]}")
    return {"seconds": round(time.time() - t0, 1), "peak_tree_pss_gib": round(peak["pss"] / GIB, 2),
            "peak_main_rss_gib": round(peak["rss"] / GIB, 2)}


def write_random_hf(path: Path, cfg, seed: int = 0) -> int:
    """A random HF checkpoint of `cfg`, written tensor by tensor; returns its size in bytes."""
    import torch

    from megalong.convert.hf_io import ShardWriter, write_json
    from megalong.convert.hf_llama import hf_config_from_model, hf_shapes

    path.mkdir(parents=True)
    torch.manual_seed(seed)
    shapes = hf_shapes(cfg)
    writer = ShardWriter(path, [(n, s, torch.bfloat16) for n, s in shapes.items()], 2 * 10**9)
    for name, shape in shapes.items():
        t = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape) * 0.02
        writer.add(name, t.to(torch.bfloat16))
    writer.close()
    write_json(path / "config.json", hf_config_from_model(cfg, "bfloat16", {"bos_token_id": 128000,
                                                                           "eos_token_id": 128001}))
    return writer.total_bytes


def same_tensors(a: Path, b: Path) -> bool:
    import torch

    from megalong.convert.hf_io import HFWeights

    wa, wb = HFWeights(a), HFWeights(b)
    if sorted(wa.shapes) != sorted(wb.shapes):
        return False
    return all(torch.equal(wa.get(n), wb.get(n)) for n in wa.shapes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama3_2_1b", help="megalong model preset giving the shape "
                                                           "(default llama3_2_1b: 1.24B parameters, tied)")
    p.add_argument("--layers", type=int, help="override the preset's number of layers (smaller, faster runs)")
    p.add_argument("--work-dir", help="where the checkpoints go (default: a temporary directory, deleted)")
    p.add_argument("--json", help="write the results here as JSON")
    args = p.parse_args(argv)

    from megalong.model.config import preset

    cfg = preset(args.preset, **({"num_layers": args.layers} if args.layers else {}))
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="convert_bench_"))
    tool = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py")]
    try:
        t0 = time.time()
        size = write_random_hf(work / "hf", cfg)
        print(f"random {args.preset} ({size / GIB:.2f} GiB bf16) written in {time.time() - t0:.0f} s", flush=True)
        rows = {"hf-to-megalong": run_measured(tool + ["hf-to-megalong", "--hf-dir", str(work / "hf"), "--out",
                                                       str(work / "ckpt"), "--no-progress"]),
                "megalong-to-hf": run_measured(tool + ["megalong-to-hf", "--ckpt", str(work / "ckpt"), "--out",
                                                       str(work / "hf_out"), "--no-progress"])}
        identical = same_tensors(work / "hf", work / "hf_out")
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    params = size // 2  # bfloat16
    print(f"\nmodel: {args.preset}, {params / 1e9:.2f}B parameters, {size / GIB:.2f} GiB in bfloat16; "
          f"round trip bit-identical: {identical}")
    print(f"{'direction':<16}{'seconds':>9}{'peak PSS (tree)':>17}{'peak RSS (main)':>17}{'× model':>9}")
    for name, r in rows.items():
        print(f"{name:<16}{r['seconds']:>9}{r['peak_tree_pss_gib']:>14} GiB{r['peak_main_rss_gib']:>14} GiB"
              f"{r['peak_tree_pss_gib'] * GIB / size:>9.2f}")
    result = {"preset": args.preset, "num_layers": cfg.num_layers, "parameters": params,
              "model_gib_bf16": round(size / GIB, 2), "round_trip_bit_identical": identical, **rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
