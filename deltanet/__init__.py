"""deltanet: linear transformers trained with the delta rule (DeltaNet)."""

from .ops import delta_rule

__version__ = "0.1.0"

__all__ = ["__version__", "delta_rule"]
