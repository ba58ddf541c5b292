"""HuggingFace Llama ⇄ megalong checkpoints (docs/checkpoint_conversion.md).

- `hf_llama`: names, QKV/SwiGLU fusion, vocab padding and configs (the one place for the mapping);
- `hf_io`: streaming safetensors reading and sharded writing;
- `megalong_io`: HF tensors into model shards, checkpoints read tensor by tensor, logits under TP/PP;
- `convert`: hf_to_megalong, megalong_to_hf, verify; `cli`: the command line.

Kept import-free: `megalong.convert.cli` is a process's main module, which megatron's checkpoint writer
re-imports in a spawned helper process, so heavy imports happen inside functions.
"""
