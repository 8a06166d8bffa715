"""DeltaNet models for Hugging Face transformers; importing this registers them with the Auto classes.

    >>> import deltanet.models
    >>> from transformers import AutoConfig
    >>> type(AutoConfig.for_model("deltanet")).__name__
    'DeltaNetConfig'
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache import DeltaNetCache
from .configuration import LAYER_TYPES, DeltaNetConfig
from .decoding import DecodeResult, decode
from .modeling import DeltaNetForCausalLM, DeltaNetModel, DeltaNetPreTrainedModel, set_decode_kernel
from .presets import PRESETS, get_config
from .sampling import SamplingConfig

AutoConfig.register(DeltaNetConfig.model_type, DeltaNetConfig, exist_ok=True)
AutoModel.register(DeltaNetConfig, DeltaNetModel, exist_ok=True)
AutoModelForCausalLM.register(DeltaNetConfig, DeltaNetForCausalLM, exist_ok=True)

__all__ = [
    "LAYER_TYPES",
    "PRESETS",
    "DecodeResult",
    "DeltaNetCache",
    "DeltaNetConfig",
    "DeltaNetForCausalLM",
    "DeltaNetModel",
    "DeltaNetPreTrainedModel",
    "SamplingConfig",
    "decode",
    "get_config",
    "set_decode_kernel",
]
