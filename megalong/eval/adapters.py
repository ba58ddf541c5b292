"""One small interface over the two kinds of model the probes evaluate.

- `MegalongModel`: the trainer's own megatron-core model, from a megalong checkpoint (saved at any
  TP/PP: dist_checkpointing reshards it to one process on load) or from a model already in memory.
- `HFModel`: an exported HuggingFace directory through `transformers` (local files only).

Both give per-token cross-entropy (documents evaluated independently, positions from 0 in each) and
greedy generation, so a probe's numbers depend on the weights, not on which adapter ran them.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from megalong.eval.common import EvalError, checkpoint_tokenizer_record

DocLengths = Optional[Sequence[Sequence[int]]]


class LanguageModelAdapter(Protocol):
    name: str
    max_length: int  # the longest input the model is configured for (max_position_embeddings)
    vocab_size: int
    tokenizer_record: Optional[dict]  # describe() of the tokenizer the model was made with, if known

    def token_losses(self, tokens: torch.Tensor, doc_lengths: DocLengths = None) -> torch.Tensor:
        """CE [b, S-1] (float32): entry t is -log p(x[t+1] | its document up to t); NaN where t+1
        opens a new document (no prediction across documents). `doc_lengths[r]` sums to S."""

    def greedy_generate(self, prompt_ids: torch.Tensor, max_new_tokens: int,
                        vocab_limit: Optional[int] = None) -> torch.Tensor:
        """[b, max_new_tokens] greedy continuations of equal-length prompts [b, S]; ids ≥ vocab_limit
        (embedding padding beyond the tokenizer) are never chosen."""

    def describe(self) -> dict:
        """What the results record about the model (kind, path, lengths, RoPE)."""


def _row_lengths(tokens: torch.Tensor, doc_lengths: DocLengths) -> list[list[int]]:
    b, S = tokens.shape
    if doc_lengths is None:
        return [[S] for _ in range(b)]
    rows = [list(map(int, r)) for r in doc_lengths]
    if len(rows) != b or any(sum(r) != S or min(r) < 1 for r in rows):
        raise EvalError(f"doc_lengths {rows} do not split {b} row(s) of {S} tokens into non-empty documents")
    return rows


def _nan_at_boundaries(ce: torch.Tensor, rows: list[list[int]]) -> torch.Tensor:
    for r, lengths in enumerate(rows):
        starts = np.cumsum(lengths)[:-1]
        if len(starts):
            ce[r, torch.as_tensor(starts - 1)] = float("nan")
    return ce


def _mask_vocab(logits: torch.Tensor, vocab_limit: Optional[int]) -> torch.Tensor:
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits = logits.clone()
        logits[..., vocab_limit:] = float("-inf")
    return logits


def ensure_single_process_megatron() -> None:
    """megatron's parallel state for one process (TP=PP=CP=1); a clear error under torchrun."""
    import torch.distributed as dist

    from megalong.runtime.distributed import ParallelConfig, init_distributed

    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise EvalError(f"megalong eval runs in one process, not under torchrun (WORLD_SIZE="
                            f"{os.environ['WORLD_SIZE']}); a checkpoint saved at any TP/PP is resharded "
                            "to one process on load — run `python -m megalong.eval ...` directly")
        init_distributed(ParallelConfig())
    from megatron.core import parallel_state as mpu

    sizes = (mpu.get_tensor_model_parallel_world_size(), mpu.get_pipeline_model_parallel_world_size(),
             mpu.get_context_parallel_world_size())
    if sizes != (1, 1, 1):
        raise EvalError(f"megalong eval needs TP=PP=CP=1 in this process, found TP/PP/CP={sizes}; run the "
                        "eval in its own process (checkpoints are resharded to TP1 on load)")


class MegalongModel:
    """The trainer's model (megatron-core GPTModel with megalong attention and the chunked CE head)."""

    def __init__(self, model: torch.nn.Module, cfg, name: str = "megalong", path: Optional[str] = None,
                 tokenizer_record: Optional[dict] = None):
        from megalong.model.build import output_head

        ensure_single_process_megatron()
        self.model, self.cfg, self.name, self.path = model, cfg, name, path
        self.head = output_head(model)
        if self.head is None:
            raise EvalError("the model has no megalong output head (is it a pipeline stage other than the last?)")
        self.max_length = int(cfg.max_position_embeddings)
        self.vocab_size = int(cfg.vocab_size)
        self.tokenizer_record = tokenizer_record
        self.device = next(model.parameters()).device

    @classmethod
    def from_checkpoint(cls, path: str | Path, attention_backend: Optional[str] = None,
                        device: Optional[str] = None, name: Optional[str] = None) -> "MegalongModel":
        from megalong.checkpoint import latest_checkpoint, load_checkpoint, model_config_from_checkpoint
        from megalong.model.build import build_model

        found = latest_checkpoint(path)
        if found is None:
            raise EvalError(f"--ckpt {path}: no complete megalong checkpoint there (no megalong.json and no "
                            "'latest' pointer); pass a run's checkpoint directory or one iter_* directory")
        cfg = model_config_from_checkpoint(found)
        if attention_backend:
            cfg = dataclasses.replace(cfg, attention_backend=attention_backend)
        ensure_single_process_megatron()
        model = build_model(cfg).to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        meta = load_checkpoint(found, [model])
        model.eval()
        return cls(model, cfg, name=name or f"{Path(path).name}", path=str(found),
                   tokenizer_record=checkpoint_tokenizer_record(meta))

    def _micro_batch(self, tokens: torch.Tensor, rows: list[list[int]]):
        from megalong.attention.module import DocumentParams
        from megalong.data.batch import PackedSample, make_micro_batch

        samples = [PackedSample(t.cpu().numpy(), np.ones(len(t), np.uint8), np.asarray(r)) for t, r in zip(tokens, rows)]
        mb = make_micro_batch(samples, position_mode="reset").to(self.device)
        return mb, DocumentParams.for_micro_batch(mb, device=self.device)

    @torch.no_grad()
    def token_losses(self, tokens: torch.Tensor, doc_lengths: DocLengths = None) -> torch.Tensor:
        rows = _row_lengths(tokens, doc_lengths)
        mb, params = self._micro_batch(tokens, rows)
        with self.head.targets(mb.labels):
            ce = self.model(mb.tokens, mb.position_ids, None, packed_seq_params=params)  # [b, S, 1]
        ce = ce[..., 0][:, :-1].float().cpu().clone()
        return _nan_at_boundaries(ce, rows)

    @torch.no_grad()
    def greedy_generate(self, prompt_ids: torch.Tensor, max_new_tokens: int,
                        vocab_limit: Optional[int] = None) -> torch.Tensor:
        """Recomputes the whole prefix for every new token (no KV cache): fine for short answers;
        only the last position's logits are computed (a pre-hook slices the head's input)."""
        def last_position_only(_module, args, kwargs):
            return (args[0][-1:],) + tuple(args[1:]), kwargs

        ids = prompt_ids.to(torch.int64).cpu()
        hook = self.head.register_forward_pre_hook(last_position_only, with_kwargs=True)
        try:
            for _ in range(max_new_tokens):
                mb, params = self._micro_batch(ids, [[ids.shape[1]]] * ids.shape[0])
                logits = self.model(mb.tokens, mb.position_ids, None, packed_seq_params=params)  # [b, 1, V]
                nxt = _mask_vocab(logits[:, -1].float(), vocab_limit).argmax(-1).cpu()
                ids = torch.cat([ids, nxt[:, None]], dim=1)
        finally:
            hook.remove()
        return ids[:, prompt_ids.shape[1]:]

    def describe(self) -> dict:
        return {"kind": "megalong", "name": self.name, "path": self.path, "max_length": self.max_length,
                "vocab_size": self.vocab_size, "rope_theta": self.cfg.rope_base,
                "num_layers": self.cfg.num_layers, "hidden_size": self.cfg.hidden_size}


def hf_rope_theta(config: dict) -> Optional[float]:
    """rope_theta from a config.json: top level (transformers 4) or rope_parameters (transformers 5)."""
    if config.get("rope_theta") is not None:
        return float(config["rope_theta"])
    params = config.get("rope_parameters") or {}
    return float(params["rope_theta"]) if params.get("rope_theta") is not None else None


def hf_tokenizer(path: str | Path):
    """The tokenizer saved in an export directory (tokenizer.json, else tokenizer.model)."""
    from megalong.data.tokenizer import load_tokenizer

    path = Path(path)
    if (path / "tokenizer.json").is_file():
        return load_tokenizer("hf", path)
    if (path / "tokenizer.model").is_file():
        return load_tokenizer("sentencepiece", path / "tokenizer.model")
    raise EvalError(f"{path} holds no tokenizer (tokenizer.json or tokenizer.model); export the tokenizer "
                    "with the model or pass --tokenizer")


class HFModel:
    """An exported HuggingFace causal LM, loaded from local files only."""

    def __init__(self, path: str | Path, device: Optional[str] = None, dtype: str = "auto",
                 name: Optional[str] = None):
        from transformers import AutoModelForCausalLM

        path = Path(path)
        if not (path / "config.json").is_file():
            raise EvalError(f"--hf-dir {path}: no config.json there; pass the directory written by "
                            "tools/convert_checkpoint.py (config.json, *.safetensors, tokenizer files)")
        self.config = json.loads((path / "config.json").read_text())
        torch_dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
                       "float16": torch.float16}.get(dtype)
        if torch_dtype is None:
            raise EvalError(f"--dtype {dtype!r}: use auto, float32, bfloat16 or float16")
        try:
            self.model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch_dtype)
        except (OSError, ValueError) as e:
            raise EvalError(f"--hf-dir {path}: transformers cannot load the model ({e})") from None
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device).eval()
        self.name, self.path = name or path.name, str(path)
        self.max_length = int(self.config.get("max_position_embeddings") or 0)
        self.vocab_size = int(self.config["vocab_size"])
        try:
            self.tokenizer_record = hf_tokenizer(path).describe()
        except EvalError:
            self.tokenizer_record = None
        # Llama-family logits are lm_head(hidden): computed chunk by chunk, never [S, vocab] at once.
        self._chunked = self.config.get("final_logit_softcapping") is None

    @torch.no_grad()
    def _doc_losses(self, ids: torch.Tensor, chunk_tokens: int = 2048) -> torch.Tensor:
        """CE [b, n-1] for rows of one document each."""
        ids = ids.to(self.device)
        if not self._chunked:
            logits = self.model(input_ids=ids).logits[:, :-1].float()
            return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").cpu()
        hidden = self.model.get_decoder()(input_ids=ids).last_hidden_state
        head = self.model.get_output_embeddings()
        out, chunk = [], max(1, chunk_tokens // ids.shape[0])  # ≤ chunk_tokens × vocab fp32 logits at once
        for a in range(0, ids.shape[1] - 1, chunk):
            b = min(a + chunk, ids.shape[1] - 1)
            logits = head(hidden[:, a:b]).float()
            out.append(F.cross_entropy(logits.transpose(1, 2), ids[:, a + 1:b + 1], reduction="none"))
        return torch.cat(out, dim=1).cpu()

    def token_losses(self, tokens: torch.Tensor, doc_lengths: DocLengths = None) -> torch.Tensor:
        rows = _row_lengths(tokens, doc_lengths)
        b, S = tokens.shape
        if all(len(r) == 1 for r in rows):
            return self._doc_losses(tokens)
        ce = torch.full((b, S - 1), float("nan"))
        for r, lengths in enumerate(rows):
            start = 0
            for n in lengths:
                if n > 1:
                    ce[r, start:start + n - 1] = self._doc_losses(tokens[r:r + 1, start:start + n])[0]
                start += n
        return ce

    @torch.no_grad()
    def greedy_generate(self, prompt_ids: torch.Tensor, max_new_tokens: int,
                        vocab_limit: Optional[int] = None) -> torch.Tensor:
        """Greedy decoding with the KV cache (prompt processed once, then one token per step)."""
        ids = prompt_ids.to(self.device, torch.int64)
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        new = []
        for step in range(max_new_tokens):
            nxt = _mask_vocab(out.logits[:, -1].float(), vocab_limit).argmax(-1)
            new.append(nxt)
            if step + 1 < max_new_tokens:
                out = self.model(input_ids=nxt[:, None], past_key_values=out.past_key_values, use_cache=True)
        return torch.stack(new, dim=1).cpu()

    def describe(self) -> dict:
        return {"kind": "hf", "name": self.name, "path": self.path, "max_length": self.max_length,
                "vocab_size": self.vocab_size, "rope_theta": hf_rope_theta(self.config),
                "model_type": self.config.get("model_type")}


def load_adapter(ckpt: Optional[str] = None, hf_dir: Optional[str] = None, name: Optional[str] = None,
                 device: Optional[str] = None, dtype: str = "auto",
                 attention_backend: Optional[str] = None) -> LanguageModelAdapter:
    if (ckpt is None) == (hf_dir is None):
        raise EvalError("give exactly one model: --ckpt DIR (megalong checkpoint) or --hf-dir DIR (HF export)")
    if ckpt is not None:
        return MegalongModel.from_checkpoint(ckpt, attention_backend=attention_backend, device=device, name=name)
    return HFModel(hf_dir, device=device, dtype=dtype, name=name)
