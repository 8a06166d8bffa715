"""deltanet: linear transformers trained with the delta rule (DeltaNet).

``import deltanet`` registers the models with the Hugging Face Auto classes
(``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM``, ``model_type = "deltanet"``).
"""

from . import models
from .models import DeltaNetConfig, DeltaNetForCausalLM, DeltaNetModel
from .ops import delta_rule

__version__ = "0.1.0"

__all__ = ["DeltaNetConfig", "DeltaNetForCausalLM", "DeltaNetModel", "__version__", "delta_rule", "models"]
