"""Runs under torchrun (4 gloo processes): HF Llama ⇄ megalong under TP1, TP2, PP2 and TP2×PP2.

argv: WORK_DIR RESULTS_JSON. For each tiny random LlamaForCausalLM variant (GQA with Llama-3.1 rope
scaling and head_dim ≠ hidden/heads; tied embeddings with a padded vocabulary and MHA) and each layout:
convert HF → megalong under that layout, load the checkpoint into a fresh model under the same layout and
compare its logits with transformers'. Then round-trip HF → megalong (TP2×PP2) → HF, train one step at
TP2×PP2 with a new rope base and export it, and run `verify` (function and command). transformers runs
on rank 0 only (its import costs seconds per process); rank 0 writes the results.
"""
import dataclasses
import json
import sys
from pathlib import Path

# megatron's checkpoint writer starts a helper with the "spawn" method, which re-imports this file as
# __mp_main__: keep the heavy imports out of that (they would cost seconds per rank).
if __name__ == "__main__":
    import numpy as np
    import torch
    import torch.distributed as dist

    from megalong.checkpoint import load_checkpoint, model_config_from_checkpoint, save_checkpoint
    from megalong.convert.cli import main as cli_main
    from megalong.convert.convert import hf_to_megalong, megalong_to_hf, verify, verify_tokens
    from megalong.convert.megalong_io import logits_on_rank0
    from megalong.data.batch import PackedSample, make_micro_batch
    from megalong.model.build import build_model
    from megalong.optim import OptimConfig, build_optimizer, build_scheduler
    from megalong.runtime.distributed import ParallelConfig, init_distributed
    from megalong.step import forward_backward, setup_model_for_training

BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1)
VARIANTS = {
    "gqa_rope_scaling": dict(BASE, vocab_size=256, num_attention_heads=8, head_dim=32, rope_theta=500000.0,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "tied_padded_mha": dict(BASE, vocab_size=251, num_key_value_heads=4, tie_word_embeddings=True),
}
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
BATCH, SEQ = 2, 24


def reinit(tp, pp):
    from megatron.core import parallel_state as mpu
    mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def make_hf_model(name, path):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(len(name))
    model = LlamaForCausalLM(LlamaConfig(**VARIANTS[name]))
    with torch.no_grad():  # norms away from 1 so that a swapped norm would show
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)


def hf_logits(path, tokens):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def logits_of_checkpoint(ckpt, tp, pp, tokens):
    cfg = model_config_from_checkpoint(ckpt)
    model = build_model(cfg, tp=tp, pp=pp).eval()
    load_checkpoint(ckpt, [model])
    return logits_on_rank0(model, cfg, tokens)


def load_hf_tensors(d) -> dict:
    from safetensors.torch import load_file
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def compare_hf_dirs(a, b) -> dict:
    from transformers import AutoConfig

    ta, tb = load_hf_tensors(a), load_hf_tensors(b)
    identical = sorted(ta) == sorted(tb) and all(
        ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape and torch.equal(ta[k], tb[k]) for k in ta)
    skip = {"transformers_version", "_name_or_path"}
    ca = {k: v for k, v in AutoConfig.from_pretrained(str(a)).to_dict().items() if k not in skip}
    cb = {k: v for k, v in AutoConfig.from_pretrained(str(b)).to_dict().items() if k not in skip}
    return {"bit_identical": identical, "n_tensors": len(ta),
            "config_diff": {k: [ca.get(k), cb.get(k)] for k in set(ca) | set(cb) if ca.get(k) != cb.get(k)}}


def train_one_step_and_export(work, ckpt, tokens, rank):
    """Starts from a converted checkpoint at TP2×PP2 with a new rope base (as a long-context stage
    does), takes one AdamW step, saves a full checkpoint (with optimizer) and exports it to HF."""
    reinit(2, 2)
    cfg = dataclasses.replace(model_config_from_checkpoint(ckpt), rope_base=8e6, max_position_embeddings=1024)
    model = build_model(cfg, tp=2, pp=2)
    (ddp,) = setup_model_for_training([model], use_distributed_optimizer=False)
    ocfg = OptimConfig(lr=1e-2, min_lr=0.0, warmup_fraction=0.0, decay_style="constant",
                       distributed_optimizer=False)
    opt = build_optimizer(ocfg, [ddp])
    build_scheduler(ocfg, opt, total_steps=10)
    load_checkpoint(ckpt, [ddp])  # the trainer's train.init_from order: wrapped model, optimizer built
    opt.reload_model_params()  # refresh any main-param copies from the loaded weights
    rng = np.random.default_rng(0)
    mbs = [make_micro_batch([PackedSample(rng.integers(0, cfg.vocab_size, 32), np.ones(32), np.array([20, 12]))])
           for _ in range(2)]
    ddp.zero_grad_buffer()
    opt.zero_grad()
    forward_backward([ddp], mbs)
    opt.step()
    trained = save_checkpoint(work / "trained", 1, [ddp], cfg, optimizer=opt)
    logits = logits_on_rank0(model.eval(), cfg, tokens)
    out = work / "trained_hf"
    if rank == 0:
        megalong_to_hf(trained, out, progress=False)
    dist.barrier()
    if rank != 0:
        return {}
    config = json.loads((out / "config.json").read_text())
    before, after = load_hf_tensors(work / "hf_tied_padded_mha"), load_hf_tensors(out)
    return {"max_weight_change": max(float((after[k] - before[k]).abs().max()) for k in before),
            "trained_export_logits_abs": float((logits - hf_logits(out, tokens)).abs().max()),
            "rope_theta": config["rope_theta"], "max_position_embeddings": config["max_position_embeddings"],
            "has_optimizer_keys": any("optimizer" in k for k in _dcp_keys(trained))}


def _dcp_keys(path):
    from torch.distributed.checkpoint import FileSystemReader
    return list(FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def main(work, out_json):
    work = Path(work)
    init_distributed(ParallelConfig())
    rank = dist.get_rank()
    if rank == 0:
        for name in VARIANTS:
            make_hf_model(name, work / f"hf_{name}")
    dist.barrier()
    results = {"logits": {}, "round_trip": {}}
    for name, hf_cfg in VARIANTS.items():
        hf_dir = work / f"hf_{name}"
        tokens = verify_tokens(hf_cfg["vocab_size"], BATCH, SEQ, seed=1)
        ref = hf_logits(hf_dir, tokens) if rank == 0 else None
        for tp, pp in LAYOUTS:
            reinit(tp, pp)
            ckpt = work / f"ckpt_{name}_tp{tp}pp{pp}"
            hf_to_megalong(hf_dir, ckpt, tp=tp, pp=pp, dtype="float32", progress=False)
            logits = logits_of_checkpoint(ckpt, tp, pp, tokens)
            if rank == 0:
                results["logits"][f"{name} TP{tp} PP{pp}"] = float((logits - ref).abs().max())
        # written at TP1 PP1, loaded at TP2 PP2 (what train.init_from does at another layout)
        reinit(2, 2)
        logits = logits_of_checkpoint(work / f"ckpt_{name}_tp1pp1", 2, 2, tokens)
        if rank == 0:
            results["logits"][f"{name} TP1PP1->TP2PP2"] = float((logits - ref).abs().max())
            megalong_to_hf(work / f"ckpt_{name}_tp2pp2", work / f"rt_{name}", progress=False)
            results["round_trip"][name] = compare_hf_dirs(hf_dir, work / f"rt_{name}")
        dist.barrier()
    tied_ckpt = work / "ckpt_tied_padded_mha_tp2pp2"
    tokens = verify_tokens(VARIANTS["tied_padded_mha"]["vocab_size"], BATCH, SEQ, seed=2)
    results["trained"] = train_one_step_and_export(work, tied_ckpt, tokens, rank)
    results["verify_exported"] = verify(work / "trained_hf", work / "trained", tp=2, pp=2, seq_len=SEQ)
    results["verify_mismatched"] = verify(work / "hf_tied_padded_mha", work / "trained", tp=2, pp=2, seq_len=SEQ)
    # The verify command as a user runs it under torchrun (last: it tears the process group down).
    results["cli_verify_mismatched_rc"] = cli_main([
        "verify", "--hf-dir", str(work / "hf_tied_padded_mha"), "--ckpt", str(work / "trained"), "--tp", "2",
        "--pp", "2", "--seq-len", str(SEQ), "--tolerance", "1e-4"])
    if rank == 0:
        Path(out_json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
