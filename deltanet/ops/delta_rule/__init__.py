"""The delta rule: reference, PyTorch chunkwise, Triton chunkwise and fused recurrent backends."""

from .chunk_torch import delta_rule_chunkwise_torch
from .reference import delta_product_reference, delta_rule_reference

__all__ = ["delta_product_reference", "delta_rule_chunkwise_torch", "delta_rule_reference"]
