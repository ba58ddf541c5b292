"""megalong: long-context training recipes (ProLong, LongAlign) on megatron-core."""

__version__ = "0.1.0"
