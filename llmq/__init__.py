"""llmq: a graph-level compiler for quantizing LLMs for deployment.

``llmq.compile(model, recipe="w8a8", output="out", calib=...)`` compiles an ONNX model and returns the
written paths and the report (see :func:`llmq.driver.compile`).
"""

__version__ = "0.1.0"

__all__ = ["compile", "__version__"]


def __getattr__(name):
    if name == "compile":  # imported lazily so that `import llmq` (and the CLI's start-up) stays light
        from .driver import compile

        return compile
    raise AttributeError(f"module 'llmq' has no attribute {name!r}")
