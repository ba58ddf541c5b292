"""Document-masked attention: one interface (registry.py), several backends, one megatron module."""
from megalong.attention.registry import (available_backends, backend_names, get_attention_fn,
                                         resolve_backend)

__all__ = ["available_backends", "backend_names", "get_attention_fn", "resolve_backend"]
