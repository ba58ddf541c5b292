"""`megalong convert` / `tools/convert_checkpoint.py`: HuggingFace Llama ⇄ megalong checkpoints.

    hf-to-megalong --hf-dir DIR --out CKPT [--tp N --pp N] [--dtype auto|bfloat16|float32]
    megalong-to-hf --ckpt CKPT --out DIR [--tokenizer-dir SRC] [--dtype auto|bfloat16|float32|float16]
    verify --hf-dir DIR --ckpt CKPT [--tp N --pp N] [--tolerance 1e-3]

Commands that build the model (hf-to-megalong, verify) run on TP×PP processes: started plainly with
--tp/--pp > 1, the command re-launches itself under torchrun with that many local processes (or run
it under torchrun/srun yourself with a multiple of TP×PP processes). megalong-to-hf is one process.
Exit status: 0 done, 1 verify above tolerance, 2 bad input (the message names the file/key).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Only the standard library at module level: megatron's checkpoint writer starts a helper process with
# the "spawn" method, which re-imports the main module (this one) before doing anything.


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert_checkpoint.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def parallel(sp):
        sp.add_argument("--tp", type=int, default=1, help="tensor-parallel size to build the model with (default 1)")
        sp.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to build the model with (default 1)")
        sp.add_argument("--no-progress", action="store_true", help="no progress bar")

    a = sub.add_parser("hf-to-megalong", help="HF Llama directory -> megalong checkpoint (weights only)",
                       description="Reads config.json and safetensors shards of a Llama-3/3.1/3.2 model and "
                                   "writes a weights-only megalong checkpoint (train.init_from consumes it). "
                                   "It reshards on load, so --tp/--pp only choose the conversion's layout.")
    a.add_argument("--hf-dir", required=True, help="HF model directory (config.json + model*.safetensors)")
    a.add_argument("--out", required=True, help="checkpoint root to create (must not exist or be empty); "
                                                "the weights land in OUT/iter_0000000 with OUT/latest")
    a.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="parameter dtype of the megalong model; auto = config.json's dtype (bfloat16/float32)")
    a.add_argument("--allow-unsafe-bin", action="store_true",
                   help="also read pickled pytorch_model*.bin weights (torch.load with weights_only=True)")
    parallel(a)

    b = sub.add_parser("megalong-to-hf", help="megalong checkpoint -> HF directory (safetensors + index)",
                       description="Streams a megalong checkpoint (any TP/PP it was trained with) into HF "
                                   "safetensors shards, config.json (the checkpoint's rope_theta and "
                                   "max_position_embeddings), generation_config.json and tokenizer files.")
    b.add_argument("--ckpt", required=True, help="checkpoint root (uses its 'latest') or an iter_* directory")
    b.add_argument("--out", required=True, help="HF directory to create (must not exist or be empty)")
    b.add_argument("--tokenizer-dir", help="source HF model directory: its tokenizer files are copied, its "
                                           "config.json gives the token ids (bos/eos/pad) and its "
                                           "generation_config.json is kept")
    b.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"],
                   help="dtype of the written tensors; auto = the checkpoint's")
    b.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard, e.g. 2GB, 500MB "
                                                           "(memory holds at most one shard; default 2GB)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")

    c = sub.add_parser("verify", help="max logit difference between an HF model and a megalong checkpoint",
                       description="Runs transformers' model of --hf-dir and megalong's model of --ckpt (under "
                                   "--tp/--pp) on the same random tokens; exits 1 above --tolerance.")
    c.add_argument("--hf-dir", required=True, help="HF model directory")
    c.add_argument("--ckpt", required=True, help="megalong checkpoint root or iter_* directory")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype both models run in (default float32; bfloat16 needs a looser tolerance)")
    c.add_argument("--tolerance", type=float, default=1e-3, help="largest accepted max |logit difference| "
                                                                 "(default 1e-3)")
    c.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default 64)")
    c.add_argument("--batch", type=int, default=2, help="sequences (default 2)")
    c.add_argument("--seed", type=int, default=0, help="seed of the random tokens")
    parallel(c)
    return p


def _relaunch_under_torchrun(nproc: int, argv: list[str]) -> int:
    from megalong.runtime.distributed import free_port

    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), "-m", "megalong.convert.cli", *argv]
    print(f"launching {nproc} processes: torchrun --nproc-per-node {nproc} -m megalong.convert.cli ...", flush=True)
    return subprocess.run(cmd, env=env).returncode


def _collective(args, fn):
    """Runs fn() with megatron's parallel state at (tp, pp) and tears it down afterwards."""
    from megalong.runtime.distributed import ParallelConfig, destroy_distributed, env_world_size, init_distributed

    if env_world_size() % (args.tp * args.pp):
        from megalong.convert.hf_llama import ConversionError
        raise ConversionError(f"{env_world_size()} processes are not a multiple of --tp {args.tp} × --pp {args.pp}")
    init_distributed(ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp))
    try:
        return fn()
    finally:
        destroy_distributed()


def _hf_to_megalong(args, argv) -> int:
    from megalong.convert.convert import check_new_output, hf_to_megalong, prepare_hf
    from megalong.runtime.distributed import env_rank, env_world_size

    if env_world_size() == 1 and args.tp * args.pp > 1:  # check everything before starting processes
        prepare_hf(args.hf_dir, args.dtype, args.allow_unsafe_bin, args.tp, args.pp)
        check_new_output(Path(args.out))
        return _relaunch_under_torchrun(args.tp * args.pp, argv)

    t0 = time.time()
    path = _collective(args, lambda: hf_to_megalong(args.hf_dir, args.out, args.tp, args.pp, args.dtype,
                                                    args.allow_unsafe_bin, not args.no_progress))
    if env_rank() == 0:
        print(json.dumps({"converted": str(args.hf_dir), "checkpoint": str(path), "tp": args.tp, "pp": args.pp,
                          "seconds": round(time.time() - t0, 1)}))
        print(f"done: start training from it with train.init_from={args.out}")
    return 0


def _megalong_to_hf(args) -> int:
    from megalong.convert.convert import megalong_to_hf
    from megalong.convert.hf_io import parse_size

    t0 = time.time()
    summary = megalong_to_hf(args.ckpt, args.out, args.tokenizer_dir, args.dtype, parse_size(args.max_shard_size),
                             not args.no_progress)
    summary["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(summary))
    if args.tokenizer_dir is None:
        print("note: no --tokenizer-dir: tokenizer files not copied; AutoModelForCausalLM loads, tokenizers will "
              "not", file=sys.stderr)
    return 0


def _verify(args, argv) -> int:
    from megalong.convert.convert import verify, verify_inputs
    from megalong.runtime.distributed import env_rank, env_world_size

    if env_world_size() == 1 and args.tp * args.pp > 1:  # check the inputs before starting processes
        verify_inputs(args.hf_dir, args.ckpt, args.tp, args.pp, args.dtype)
        return _relaunch_under_torchrun(args.tp * args.pp, argv)

    diff = _collective(args, lambda: verify(args.hf_dir, args.ckpt, args.tp, args.pp, args.dtype, args.batch,
                                            args.seq_len, args.seed))
    ok = diff <= args.tolerance
    if env_rank() == 0:
        print(f"max |logit difference| = {diff:.3e} over {args.batch}x{args.seq_len} tokens "
              f"(TP{args.tp} PP{args.pp}, {args.dtype}); tolerance {args.tolerance:.1e}: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from megalong.convert.hf_llama import ConversionError

    try:
        if getattr(args, "tp", 1) < 1 or getattr(args, "pp", 1) < 1:
            raise ConversionError("--tp and --pp must be ≥ 1")
        if args.command == "hf-to-megalong":
            return _hf_to_megalong(args, argv)
        if args.command == "megalong-to-hf":
            return _megalong_to_hf(args)
        return _verify(args, argv)
    except (ConversionError, FileNotFoundError, ValueError) as e:  # ValueError: megalong's config errors
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
