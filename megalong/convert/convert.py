"""The three conversions: HF → megalong (collective, any TP/PP), megalong → HF (one process, no model
built), and verify (both models on the same tokens).

Every check that can fail on user input (config, shards, tensor names and shapes, parallel sizes,
output directory) runs before anything is written; outputs appear only when complete (megalong's
checkpoint via its temp-dir + `latest` pointer, HF directories via a renamed `.partial` directory).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from megalong.convert.hf_io import HFWeights, ShardWriter, copy_tokenizer_files, read_json, write_json
from megalong.convert.hf_llama import (DTYPES, ConversionError, check_hf_tensors, generation_config,
                                       hf_config_from_model, hf_dtype_name, hf_shapes, hf_sources, megatron_names,
                                       model_config_from_hf, to_hf)
from megalong.model.config import ModelConfig


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def import_dtype(requested: str, hf: dict, where: str) -> str:
    """megalong params_dtype for an HF model: `requested`, or the config's dtype when 'auto'."""
    if requested != "auto":
        return requested
    name = hf_dtype_name(hf)
    if name in ("bfloat16", "float32"):
        return name
    raise ConversionError(f"{where}: dtype {name!r} cannot be kept as is; megalong trains in bfloat16 or float32: "
                          "pass --dtype bfloat16 or --dtype float32 (exact)")


def check_parallel(cfg: ModelConfig, tp: int, pp: int, where: str) -> None:
    try:
        cfg.validate(tp=tp, pp=pp)
    except ValueError as e:
        raise ConversionError(f"{where}: {e}") from None


def prepare_hf(hf_dir: str | Path, dtype: str = "auto", allow_unsafe_bin: bool = False, tp: int = 1,
               pp: int = 1) -> tuple[ModelConfig, HFWeights, dict]:
    """Reads and checks an HF Llama directory: (ModelConfig, lazy weights, config.json)."""
    hf_dir = Path(hf_dir)
    where = str(hf_dir / "config.json")
    hf = read_json(hf_dir / "config.json")
    cfg = model_config_from_hf(hf, where, import_dtype(dtype, hf, where), name=hf_dir.name)
    check_parallel(cfg, tp, pp, where)
    weights = HFWeights(hf_dir, allow_unsafe_bin)
    check_hf_tensors(cfg, weights.shapes, str(hf_dir))
    return cfg, weights, hf


def check_new_output(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"{out}: exists and is not an empty directory; choose a new --out")


def hf_to_megalong(hf_dir: str | Path, out: str | Path, tp: int = 1, pp: int = 1, dtype: str = "auto",
                   allow_unsafe_bin: bool = False, progress: bool = True) -> Path:
    """Collective: every rank of a megatron parallel state initialised at (tp, pp) calls it. Each rank
    builds its stage, copies its shards from the HF tensors (read one at a time) and the checkpoint
    is written with megatron dist_checkpointing (reshardable to any TP/PP). Returns its directory."""
    from megalong.checkpoint import save_checkpoint
    from megalong.convert.megalong_io import load_hf_into_model
    from megalong.model.build import build_model

    cfg, weights, hf = prepare_hf(hf_dir, dtype, allow_unsafe_bin, tp, pp)
    check_new_output(Path(out))
    if dist.is_initialized():
        dist.barrier()  # every rank checked the output before rank 0 creates it
    model = build_model(cfg, tp=tp, pp=pp, initialize=False)  # load_full_state sets every parameter
    n_params = len(list(model.parameters()))
    with tqdm(total=n_params, desc="hf -> megalong (rank 0's tensors)", unit="tensor",
              disable=not progress or _rank() != 0) as bar:
        load_hf_into_model(model, weights.get, cfg, on_tensor=lambda _name: bar.update())
    source = {"hf_dir": str(Path(hf_dir).resolve()), "config": hf}
    return save_checkpoint(out, 0, [model], cfg, resolved_config={"converted_from": source})


def _export_template(meta: dict, tokenizer_dir: Optional[Path]) -> tuple[Optional[dict], Optional[dict]]:
    """(config.json, generation_config.json) of the source model, for token ids and generation settings."""
    config = gen = None
    if tokenizer_dir is not None:
        if (tokenizer_dir / "config.json").is_file():
            config = read_json(tokenizer_dir / "config.json")
        if (tokenizer_dir / "generation_config.json").is_file():
            gen = read_json(tokenizer_dir / "generation_config.json")
    if config is None:
        config = ((meta.get("config") or {}).get("converted_from") or {}).get("config")
    return config, gen


def megalong_to_hf(ckpt: str | Path, out: str | Path, tokenizer_dir: Optional[str | Path] = None,
                   dtype: str = "auto", max_shard_bytes: int = 2 * 10**9, progress: bool = True) -> dict:
    """One process, no model built: streams the checkpoint layer by layer into safetensors shards,
    writes config.json (the checkpoint's rope_theta and max_position_embeddings), generation_config.json
    and the tokenizer files. Returns a summary."""
    from megalong.checkpoint import latest_checkpoint, model_config_from_checkpoint, read_meta
    from megalong.convert.megalong_io import CheckpointTensors

    found = latest_checkpoint(ckpt)
    if found is None:
        raise ConversionError(f"{ckpt}: no complete megalong checkpoint (no megalong.json, no 'latest' pointer)")
    meta, cfg = read_meta(found), model_config_from_checkpoint(found)
    tensors = CheckpointTensors(found, cfg)
    out = Path(out)
    check_new_output(out)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else None
    template, gen_template = _export_template(meta, tokenizer_dir)
    torch_dtype = tensors.dtype(megatron_names(cfg)[0]) if dtype == "auto" else DTYPES[dtype]
    shapes = hf_shapes(cfg)
    plan = [(h, shapes[h], torch_dtype) for name in megatron_names(cfg) for h in hf_sources(name)]
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        writer = ShardWriter(tmp, plan, max_shard_bytes)
        with tqdm(total=len(plan), desc="megalong -> hf", unit="tensor", disable=not progress) as bar:
            for name, tensor in tensors:
                for hf_name, part in to_hf(name, tensor, cfg):
                    writer.add(hf_name, part)
                    bar.update()
        writer.close()
        hf_config = hf_config_from_model(cfg, _dtype_name(torch_dtype), template)
        write_json(tmp / "config.json", hf_config)
        write_json(tmp / "generation_config.json", generation_config(hf_config, gen_template))
        tok_files = copy_tokenizer_files(tokenizer_dir, tmp) if tokenizer_dir is not None else []
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"checkpoint": str(found), "out": str(out), "step": meta.get("step"), "shards": len(writer.files),
            "bytes": writer.total_bytes, "dtype": _dtype_name(torch_dtype), "tokenizer_files": tok_files,
            "rope_theta": cfg.rope_base, "max_position_embeddings": cfg.max_position_embeddings,
            "token_ids_from": "template" if template else "none"}


def verify_tokens(vocab_size: int, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq_len), generator=g)


def verify_inputs(hf_dir: str | Path, ckpt: str | Path, tp: int = 1, pp: int = 1,
                  dtype: str = "float32") -> tuple[Path, ModelConfig]:
    """(checkpoint directory, its ModelConfig in `dtype`) after checking both models can be compared."""
    from megalong.checkpoint import latest_checkpoint, model_config_from_checkpoint

    found = latest_checkpoint(ckpt)
    if found is None:
        raise ConversionError(f"{ckpt}: no complete megalong checkpoint (no megalong.json, no 'latest' pointer)")
    cfg = dataclasses.replace(model_config_from_checkpoint(found), params_dtype=dtype)
    check_parallel(cfg, tp, pp, str(found))
    hf = read_json(Path(hf_dir) / "config.json")
    if hf.get("vocab_size") != cfg.vocab_size:
        raise ConversionError(f"{hf_dir}/config.json: vocab_size={hf.get('vocab_size')} but the checkpoint's is "
                              f"{cfg.vocab_size}; these are not the same model")
    return found, cfg


def verify(hf_dir: str | Path, ckpt: str | Path, tp: int = 1, pp: int = 1, dtype: str = "float32",
           batch: int = 2, seq_len: int = 64, seed: int = 0) -> float:
    """Collective at (tp, pp): max |logit difference| between the megalong checkpoint (run under this
    layout) and transformers' model of `hf_dir` (on rank 0), on the same random tokens; the same value
    on every rank."""
    from megalong.checkpoint import load_checkpoint
    from megalong.convert.megalong_io import logits_on_rank0
    from megalong.model.build import build_model

    found, cfg = verify_inputs(hf_dir, ckpt, tp, pp, dtype)
    model = build_model(cfg, tp=tp, pp=pp).eval()
    load_checkpoint(found, [model])
    tokens = verify_tokens(cfg.vocab_size, batch, seq_len, seed)
    logits = logits_on_rank0(model, cfg, tokens)
    del model
    diff = torch.tensor([0.0], dtype=torch.float64)
    if _rank() == 0:
        from transformers import AutoModelForCausalLM

        ref_model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=DTYPES[dtype]).eval()
        with torch.no_grad():
            ref = ref_model(tokens).logits.float()
        diff[0] = float((logits - ref).abs().max())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(diff, src=0)
    return float(diff[0])
