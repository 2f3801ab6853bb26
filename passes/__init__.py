"""llmq.passes — graph rewrites; each is a :class:`llmq.ir.passes.Pass` registered here by name."""

from .quantize_activations import QuantizeActivationsPass
from .quantize_dynamic import QuantizeActivationsPerTokenPass
from .quantize_weights import QuantizeWeightsPass
from .sensitivity import AnalyzeSensitivityPass
from .smooth_quant import FoldSmoothQuantScalesPass
from .split_outliers import SplitOutlierChannelsPass

REGISTRY = {p.name: p for p in (FoldSmoothQuantScalesPass, SplitOutlierChannelsPass, AnalyzeSensitivityPass, QuantizeActivationsPass, QuantizeActivationsPerTokenPass, QuantizeWeightsPass)}

__all__ = ["REGISTRY", "AnalyzeSensitivityPass", "FoldSmoothQuantScalesPass", "QuantizeActivationsPass", "QuantizeActivationsPerTokenPass", "QuantizeWeightsPass", "SplitOutlierChannelsPass"]
