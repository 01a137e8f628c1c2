"""LLM gateway: a hot realtime model and a durable batch queue sharing one GPU node."""

__version__ = "0.1.0"
