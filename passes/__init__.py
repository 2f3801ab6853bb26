"""llmq.passes — graph rewrites; each is a :class:`llmq.ir.passes.Pass` registered here by name."""

from .awq import ActivationAwareScalesPass
from .gptq import GPTQPass
from .low_rank import QuantizeWeightsLowRankPass
from .quantize_activations import QuantizeActivationsPass
from .quantize_dynamic import QuantizeActivationsPerTokenPass
from .quantize_kv_cache import QuantizeKVCachePass
from .quantize_progressive import QuantizeWeightsProgressivePass
from .quantize_weights import QuantizeWeightsPass
from .reorder_channels import ReorderChannelsPass
from .sensitivity import AnalyzeSensitivityPass
from .smooth_attention import FoldSmoothAttentionScalesPass
from .smooth_quant import FoldSmoothQuantScalesPass
from .split_outliers import SplitOutlierChannelsPass
from .split_range import SplitRangePass

REGISTRY = {p.name: p for p in (FoldSmoothQuantScalesPass, ActivationAwareScalesPass, FoldSmoothAttentionScalesPass, SplitOutlierChannelsPass, SplitRangePass, ReorderChannelsPass, AnalyzeSensitivityPass, QuantizeActivationsPass, QuantizeActivationsPerTokenPass, QuantizeKVCachePass, QuantizeWeightsPass, QuantizeWeightsLowRankPass, QuantizeWeightsProgressivePass, GPTQPass)}

__all__ = ["REGISTRY", "ActivationAwareScalesPass", "AnalyzeSensitivityPass", "FoldSmoothAttentionScalesPass", "FoldSmoothQuantScalesPass", "GPTQPass", "QuantizeActivationsPass", "QuantizeActivationsPerTokenPass", "QuantizeKVCachePass", "QuantizeWeightsLowRankPass", "QuantizeWeightsPass", "QuantizeWeightsProgressivePass", "ReorderChannelsPass", "SplitOutlierChannelsPass", "SplitRangePass"]
