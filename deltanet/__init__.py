"""deltanet: linear transformers trained with the delta rule (DeltaNet).

``import deltanet`` registers the models with the Hugging Face Auto classes
(``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM``, ``model_type = "deltanet"``).

The import itself is cheap (no torch, no transformers): the ``deltanet`` command line starts
in a fraction of a second. The public names below load on first use, and the Auto-class
registration happens when transformers' ``transformers.models.auto`` package is imported
(right away if it already is), so ``import deltanet`` followed by
``AutoModelForCausalLM.from_pretrained(...)`` works as before.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

# public name -> module that defines it (imported on first attribute access, PEP 562)
_LAZY = {
    "DeltaNetConfig": "deltanet.models",
    "DeltaNetForCausalLM": "deltanet.models",
    "DeltaNetModel": "deltanet.models",
    "delta_rule": "deltanet.ops",
}

__all__ = ["DeltaNetConfig", "DeltaNetForCausalLM", "DeltaNetModel", "__version__", "delta_rule", "models"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name == "models":
        return importlib.import_module("deltanet.models")
    raise AttributeError(f"module 'deltanet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


_AUTO = "transformers.models.auto"


def _register_auto_classes() -> None:
    importlib.import_module("deltanet.models")  # registers on import


class _RegisterOnAutoImport(importlib.abc.MetaPathFinder):
    """Registers deltanet with the Auto classes once ``transformers.models.auto`` has loaded.

    A one-shot finder: it finds the package's spec with the other finders and wraps that
    module's ``exec_module`` so the registration runs right after the package body.
    """

    def find_spec(self, fullname, path, target=None):
        if fullname != _AUTO:
            return None
        _remove_hook()
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        inner = spec.loader.exec_module

        def exec_module(module):
            inner(module)
            _register_auto_classes()

        spec.loader.exec_module = exec_module  # this module's own loader instance
        return spec


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterOnAutoImport)]


if _AUTO in sys.modules:  # transformers' Auto classes are already in use: register now
    _register_auto_classes()
elif not any(isinstance(f, _RegisterOnAutoImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterOnAutoImport())
