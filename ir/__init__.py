"""llmq.ir — the ground floor: graph handle, structure discovery, pass contract. Imports no other llmq folder."""

from .errors import LlmqError, PassError, UsageError
from .graph import Graph
from .structure import Linear, Structure, discover

__all__ = ["Graph", "Linear", "LlmqError", "PassError", "Structure", "UsageError", "discover"]
