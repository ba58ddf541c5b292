"""HuggingFace Llama ⇄ megatron names, tensors and configs: the one place for this mapping.

Megatron side (full TP1/PP1 names, as `megalong.model.layout` uses them):
- `linear_qkv` rows are grouped per KV head: for group g, [q heads of g (Hq/Hkv · D rows); k_g (D); v_g (D)];
- `linear_fc1` is [gate; up]; norms, `linear_proj` (o_proj) and `linear_fc2` (down_proj) map one to one;
- embedding and output rows are padded from `vocab_size` to `padded_vocab_size` (zeros; the head masks
  their logits) and stripped again on export.
HF Llama's q/k rows already use the rotate-half RoPE layout megalong applies, so no permutation is needed.
TP splitting and PP layer offsets are `megalong.model.layout`'s job, not this module's.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Optional

import torch

from megalong.model.config import ModelConfig, RopeScaling


class ConversionError(ValueError):
    """A checkpoint or config that cannot be converted; the message names the file/key and the fix."""


ARCHITECTURE = "LlamaForCausalLM"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Buffers some older checkpoints carry; they are recomputed from the config, never weights.
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)

# megatron layer parameter (after "decoder.layers.{i}.") -> HF layer tensors (after "model.layers.{i}.")
LAYER_PARAMS = {
    "input_layernorm.weight": ("input_layernorm.weight",),
    "self_attention.linear_qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                         "self_attn.v_proj.weight"),
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight",),
    "pre_mlp_layernorm.weight": ("post_attention_layernorm.weight",),
    "mlp.linear_fc1.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.linear_fc2.weight": ("mlp.down_proj.weight",),
}
EMBEDDING, FINAL_NORM, OUTPUT = "embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"
GLOBAL_PARAMS = {EMBEDDING: ("model.embed_tokens.weight",), FINAL_NORM: ("model.norm.weight",),
                 OUTPUT: ("lm_head.weight",)}


# ----------------------------------------------------------------------------------------- configs
def _rope_from_hf(hf: dict, where: str) -> tuple[float, Optional[RopeScaling]]:
    """rope_theta and Llama-3.1 scaling from either config style (v4: rope_theta + rope_scaling,
    v5: rope_parameters)."""
    params = dict(hf.get("rope_parameters") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = params if params else dict(hf.get("rope_scaling") or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise ConversionError(f"{where}: rope type {rope_type!r} is not supported; megalong implements "
                              "plain RoPE and Llama-3.1 ('llama3') scaling only")
    try:
        return float(theta), RopeScaling(
            factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))
    except KeyError as e:
        raise ConversionError(f"{where}: llama3 rope scaling lacks key {e.args[0]!r}") from None


def _require(hf: dict, key: str, where: str):
    if hf.get(key) is None:
        raise ConversionError(f"{where}: missing key {key!r} (is this a Llama config.json?)")
    return hf[key]


def model_config_from_hf(hf: dict, where: str = "config.json", params_dtype: str = "bfloat16",
                         name: str = "hf-llama") -> ModelConfig:
    """ModelConfig of an HF Llama-3/3.1/3.2 config.json; refuses what megalong's model cannot represent."""
    archs = hf.get("architectures") or []
    if archs != [ARCHITECTURE] or hf.get("model_type") != "llama":
        raise ConversionError(f"{where}: architectures={archs} model_type={hf.get('model_type')!r}: only "
                              f"{ARCHITECTURE} (model_type 'llama': Llama-3, 3.1, 3.2) is supported")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"{where}: hidden_act={act!r} is not supported; megalong's Llama MLP is SwiGLU (silu)")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ConversionError(f"{where}: {key}=true is not supported; megalong's Llama has no biases")
    theta, scaling = _rope_from_hf(hf, where)
    heads, hidden = _require(hf, "num_attention_heads", where), _require(hf, "hidden_size", where)
    head_dim = hf.get("head_dim")
    return ModelConfig(
        num_layers=_require(hf, "num_hidden_layers", where), hidden_size=hidden, num_attention_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        ffn_hidden_size=_require(hf, "intermediate_size", where), vocab_size=_require(hf, "vocab_size", where),
        head_dim=None if head_dim in (None, hidden // heads) else head_dim,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_base=theta, rope_scaling=scaling,
        max_position_embeddings=_require(hf, "max_position_embeddings", where),
        init_std=float(hf.get("initializer_range", 0.02)), params_dtype=params_dtype,
        name=name,
    )


def hf_dtype_name(hf: dict) -> Optional[str]:
    return hf.get("dtype") or hf.get("torch_dtype")


TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def hf_config_from_model(cfg: ModelConfig, dtype: str, template: Optional[dict] = None) -> dict:
    """config.json for a megalong model: architecture from `cfg` (the trained stage's rope_theta and
    max_position_embeddings), token ids from `template` (the source model's config.json) when given.
    Written in the Llama-3.1 hub style (rope_theta + rope_scaling), which transformers 4.x and 5.x read."""
    template = template or {}
    s = cfg.rope_scaling
    out = {
        "architectures": [ARCHITECTURE], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.kv_channels, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_base,
        "rope_scaling": None if s is None else {
            "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_position_embeddings},
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "attention_dropout": 0.0,
        "mlp_bias": False, "initializer_range": cfg.init_std, "pretraining_tp": 1, "use_cache": True,
        "torch_dtype": dtype,
    }
    for key in TOKEN_ID_KEYS:  # null when unknown: transformers' defaults (1, 2) are not Llama-3's ids
        out[key] = template.get(key)
    return out


def generation_config(hf_config: dict, template: Optional[dict] = None) -> dict:
    """generation_config.json: the source model's when given (Instruct models list several EOS ids),
    else the token ids of config.json."""
    if template:
        return dict(template)
    return {k: hf_config[k] for k in TOKEN_ID_KEYS if hf_config.get(k) is not None}


# ----------------------------------------------------------------------------------------- names
def megatron_names(cfg: ModelConfig) -> list[str]:
    """Full (TP1/PP1) parameter names of the model, in file order (embedding, layers, norm, output)."""
    names = [EMBEDDING]
    for i in range(cfg.num_layers):
        names += [f"decoder.layers.{i}.{p}" for p in LAYER_PARAMS]
    names.append(FINAL_NORM)
    if not cfg.tie_embeddings:
        names.append(OUTPUT)
    return names


def split_layer_name(name: str) -> tuple[Optional[int], str]:
    """("decoder.layers.3.mlp.linear_fc1.weight") -> (3, "mlp.linear_fc1.weight"); (None, name) otherwise."""
    if name.startswith("decoder.layers."):
        index, rest = name[len("decoder.layers."):].split(".", 1)
        return int(index), rest
    return None, name


def hf_sources(name: str) -> tuple[str, ...]:
    """The HF tensors that make the megatron tensor `name` (in fusion order)."""
    layer, rest = split_layer_name(name)
    if layer is None:
        return GLOBAL_PARAMS[name]
    return tuple(f"model.layers.{layer}.{p}" for p in LAYER_PARAMS[rest])


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF checkpoint of `cfg` must hold, with its shape, in megatron file order."""
    h, d, f = cfg.hidden_size, cfg.kv_channels, cfg.ffn_hidden_size
    q, kv = cfg.num_attention_heads * d, cfg.num_kv_heads * d
    per_layer = {"input_layernorm.weight": (h,), "self_attn.q_proj.weight": (q, h),
                 "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
                 "self_attn.o_proj.weight": (h, q), "post_attention_layernorm.weight": (h,),
                 "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f)}
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        shapes.update({f"model.layers.{i}.{k}": v for k, v in per_layer.items()})
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def check_hf_tensors(cfg: ModelConfig, found: dict[str, tuple[int, ...]], where: str) -> None:
    """Every expected tensor present with its shape, nothing unknown: errors name the tensor."""
    expected = hf_shapes(cfg)
    for name, shape in expected.items():
        if name not in found:
            raise ConversionError(f"{where}: tensor {name} is missing (expected shape {list(shape)} for "
                                  f"this config.json); the checkpoint is incomplete or not {ARCHITECTURE}")
        if tuple(found[name]) != shape:
            raise ConversionError(f"{where}: tensor {name} has shape {list(found[name])}, but config.json "
                                  f"implies {list(shape)}; the weights do not match the config")
    for name in found:
        if name in expected or name.endswith(IGNORED_HF_SUFFIXES):
            continue
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # some tied checkpoints store the (identical) output matrix too
        raise ConversionError(f"{where}: unexpected tensor {name} (shape {list(found[name])}): not part of a "
                              f"{cfg.num_layers}-layer bias-free {ARCHITECTURE}; refusing to drop it silently")


# ----------------------------------------------------------------------------------------- tensors
def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """HF q/k/v projections -> megatron's linear_qkv (rows grouped per KV head)."""
    g, d, h = cfg.num_kv_heads, cfg.kv_channels, q.shape[1]
    return torch.cat([q.reshape(g, -1, h), k.reshape(g, d, h), v.reshape(g, d, h)], dim=1).reshape(-1, h)


def split_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, d, h = cfg.num_kv_heads, cfg.kv_channels, qkv.shape[1]
    q_rows = cfg.num_attention_heads // g * d
    q, k, v = qkv.reshape(g, q_rows + 2 * d, h).split([q_rows, d, d], dim=1)
    return q.reshape(-1, h).contiguous(), k.reshape(-1, h).contiguous(), v.reshape(-1, h).contiguous()


def pad_vocab(t: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    extra = cfg.padded_vocab_size - t.shape[0]
    return t if extra == 0 else torch.cat([t, t.new_zeros(extra, *t.shape[1:])], dim=0)


def to_megatron(name: str, read: Callable[[str], torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """The full megatron tensor `name`, built from HF tensors fetched one by one with `read`."""
    parts = [read(s) for s in hf_sources(name)]
    if name.endswith("linear_qkv.weight"):
        return fuse_qkv(*parts, cfg)
    if name.endswith("linear_fc1.weight"):
        return torch.cat(parts, dim=0)
    if name in (EMBEDDING, OUTPUT):
        return pad_vocab(parts[0], cfg)
    return parts[0]


def to_hf(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs of one full megatron tensor; vocab padding stripped."""
    sources = hf_sources(name)
    if name.endswith("linear_qkv.weight"):
        parts = split_qkv(tensor, cfg)
    elif name.endswith("linear_fc1.weight"):
        parts = tuple(p.contiguous() for p in tensor.chunk(2, dim=0))
    elif name in (EMBEDDING, OUTPUT):
        parts = (tensor[:cfg.vocab_size].contiguous(),)
    else:
        parts = (tensor.contiguous(),)
    return zip(sources, parts)


def megatron_shape(name: str, cfg: ModelConfig) -> tuple[int, ...]:
    """Full (unsharded) shape of megatron tensor `name`, vocab padding included."""
    shapes = hf_shapes(dataclasses.replace(cfg, tie_embeddings=False))
    src = [shapes[s] for s in hf_sources(name)]
    if len(src) > 1:
        return (sum(s[0] for s in src),) + tuple(src[0][1:])
    if name in (EMBEDDING, OUTPUT):
        return (cfg.padded_vocab_size,) + tuple(src[0][1:])
    return tuple(src[0])
