"""llmq: a graph-level compiler for quantizing LLMs."""
__version__ = "0.1.0"
