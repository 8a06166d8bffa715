"""Model building blocks: the DeltaNet mixer, attention, linear attention, conv, norm, MLP."""

from .attention import AttentionMixer, apply_rope
from .conv import ShortConvolution
from .delta_net import DeltaNetMixer
from .linear_attention import LinearAttentionMixer, linear_attention
from .mlp import SwiGLU
from .norm import RMSNorm

__all__ = [
    "AttentionMixer",
    "DeltaNetMixer",
    "LinearAttentionMixer",
    "RMSNorm",
    "ShortConvolution",
    "SwiGLU",
    "apply_rope",
    "linear_attention",
]
