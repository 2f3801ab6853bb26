"""llmq.passes — graph rewrites; each is a :class:`llmq.ir.passes.Pass` registered here by name."""

from .quantize_activations import QuantizeActivationsPass
from .quantize_weights import QuantizeWeightsPass

REGISTRY = {p.name: p for p in (QuantizeActivationsPass, QuantizeWeightsPass)}

__all__ = ["REGISTRY", "QuantizeActivationsPass", "QuantizeWeightsPass"]
