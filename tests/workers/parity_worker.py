"""Runs under torchrun (4 gloo processes): every parallel layout against the one-process reference.

For each layout (TP, PP, CP; DP fills the rest) the same initial weights and the same global batch
give a loss, full gradients and parameters after one AdamW step; rank 0 writes the largest
differences from the reference to the JSON file named on the command line.
"""
import json
import os
import sys

import numpy as np
import torch

from megalong.data.batch import PackedSample, make_micro_batch
from megalong.model.build import build_model
from megalong.model.config import preset
from megalong.model.layout import gather_full_state, load_full_state
from megalong.optim import OptimConfig, build_optimizer, build_scheduler
from megalong.runtime.distributed import ParallelConfig, init_distributed
from megalong.step import forward_backward, setup_model_for_training

LR, BETAS, WD, EPS, CLIP = 1e-4, (0.9, 0.95), 0.1, 1e-5, 1.0
SEQ, N_SAMPLES = 32, 8
# Adam's eps is 1e-5 here (not 1e-8): with near-zero gradients the 1e-7 float noise between layouts would
# otherwise be amplified into visibly different updates, hiding real errors behind eps sensitivity.
# (TP, PP, CP, distributed optimizer); DP = 4 / (TP·PP·CP)
LAYOUTS = [(1, 1, 1, True), (1, 1, 1, False), (2, 1, 1, False), (1, 2, 1, False), (1, 1, 2, False),
           (2, 2, 1, False), (2, 1, 2, True), (1, 2, 2, False)]


def make_batch(loss_mode, seed=0):
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(N_SAMPLES):
        cuts = np.sort(rng.choice(np.arange(1, SEQ), size=rng.integers(1, 4), replace=False))
        lengths = np.diff(np.concatenate([[0], cuts, [SEQ]]))
        mask = (rng.random(SEQ) < 0.7).astype(np.float32)
        samples.append(PackedSample(rng.integers(0, 256, SEQ), mask, lengths))
    return [make_micro_batch([s], loss_mode=loss_mode) for s in samples]


def _ref_loss_and_grads(model, mbs):
    from megalong.attention.module import DocumentParams
    from megalong.model.build import output_head
    num, den = 0.0, sum(float(mb.loss_weights.double().sum()) for mb in mbs)
    model.zero_grad()
    for mb in mbs:
        with output_head(model).targets(mb.labels):
            ce = model(mb.tokens, mb.position_ids, None, packed_seq_params=DocumentParams.for_micro_batch(mb))
        l = (ce.squeeze(-1) * mb.loss_weights).sum() / den
        l.backward()
        num += float(l)
    return num, {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def reference(model, mbs):
    """Plain autograd on one full model: loss and grads, torch AdamW (+ clipping), loss and grads again."""
    loss1, grads1 = _ref_loss_and_grads(model, mbs)
    torch.nn.utils.clip_grad_norm_(list(model.parameters()), CLIP)
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=BETAS, eps=EPS)
    opt.step()
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss2, grads2 = _ref_loss_and_grads(model, mbs)
    return loss1, grads1, after, loss2, grads2


def rel_err(a, b):
    return float((a - b).abs().max() / (b.abs().max() + 1e-12))


def max_rel(grads, ref):
    return max(rel_err(grads[k], ref[k]) for k in ref)


def run_layout(tp, pp, cp, distopt, full0, mbs_all, ref, tied):
    from megatron.core import parallel_state as mpu
    mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                  context_parallel_size=cp)
    cfg = preset("tiny", num_layers=4, tie_embeddings=tied)
    model = build_model(cfg, tp=tp, pp=pp, cp=cp)
    load_full_state(model, full0, tied=tied)
    (ddp,) = setup_model_for_training([model], use_distributed_optimizer=distopt)
    ocfg = OptimConfig(lr=LR, min_lr=0.0, weight_decay=WD, beta1=BETAS[0], beta2=BETAS[1], eps=EPS,
                       clip_grad=CLIP, distributed_optimizer=distopt, warmup_fraction=0.0, decay_style="constant")
    opt = build_optimizer(ocfg, [ddp])
    build_scheduler(ocfg, opt, total_steps=10)  # applies the LR and wd_mult (no decay on norms)
    dp, dp_rank = mpu.get_data_parallel_world_size(), mpu.get_data_parallel_rank()
    per = len(mbs_all) // dp
    mine = mbs_all[dp_rank * per:(dp_rank + 1) * per]
    out = {"layout": f"TP{tp} PP{pp} CP{cp} DP{dp}" + (" distopt" if distopt else "") + (" tied" if tied else "")}
    ref_loss1, ref_grads1, ref_after, ref_loss2, ref_grads2 = ref
    for step, (ref_loss, ref_grads) in enumerate([(ref_loss1, ref_grads1), (ref_loss2, ref_grads2)], 1):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        res = forward_backward([ddp], mine)
        out[f"loss{step}_abs"] = abs(res.loss - ref_loss)
        if not distopt:  # with the distributed optimizer each rank holds only its reduced grad shard
            out[f"grad{step}_rel"] = max_rel(gather_full_state(ddp, "grad", tied=tied), ref_grads)
        if step == 1:
            opt.step()
            params = gather_full_state(ddp, "param", tied=tied)
            out["param_abs_after_step"] = max(float((params[k] - ref_after[k]).abs().max()) for k in ref_after)
            if os.environ.get("PARITY_DEBUG"):
                out["worst"] = sorted((float((params[k] - ref_after[k]).abs().max()), k) for k in ref_after)[-3:]
    return out


SCENARIOS = [("token", False, LAYOUTS), ("token", True, [(2, 2, 1, False)]),
             ("sequence", False, [(1, 1, 1, True), (1, 1, 2, False), (2, 2, 1, False)])]


def main(out_path):
    from megatron.core import parallel_state as mpu
    init_distributed(ParallelConfig())
    only = os.environ.get("PARITY_LAYOUTS")
    results = []
    for loss_mode, tied, layouts in SCENARIOS:
        cfg = preset("tiny", num_layers=4, tie_embeddings=tied)
        mpu.destroy_model_parallel()
        mpu.initialize_model_parallel()
        torch.manual_seed(0)
        base = build_model(cfg)
        full0 = {k: v.clone() for k, v in gather_full_state(base, tied=tied).items()}
        mbs = make_batch(loss_mode)
        ref = reference(base, mbs)
        for tp, pp, cp, distopt in layouts:
            if only and f"{tp}{pp}{cp}" not in only.split(","):
                continue
            r = run_layout(tp, pp, cp, distopt, full0, mbs, ref, tied)
            r["layout"] += f" {loss_mode}"
            results.append(r)
            if torch.distributed.get_rank() == 0:
                print("PARITY", json.dumps(r), flush=True)
    if torch.distributed.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
