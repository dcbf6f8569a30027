"""lorakit: the modern family of low-rank fine-tuning methods, one API, faithful to the papers."""

from .api import (adapter_layers, attach, detach, disabled, get_state, hooks, merge, merge_and_unload,
                  trainable_parameters, unmerge)
from .config import AdapterConfig
from .core.registry import get_method
from .errors import AdapterFileError, ConfigError, LorakitError, TargetError, TrainingError
from .io.peft_export import export_peft
from .io.persistence import load, save
from .methods.lora import LoraConfig, RsLoraConfig
from .methods.lora_ga import LoraGaConfig
from .methods.lora_sb import LoraSbConfig
from .methods.lora_xs import LoraXsConfig
from .methods.olora import OloraConfig
from .methods.pissa import PissaConfig

# Bound last on purpose: importing the `lorakit.methods` subpackage (above) sets the attribute
# `lorakit.methods` to that package; the public name is the registry function.
from .core.registry import methods  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig", "AdapterFileError", "ConfigError", "LoraConfig", "LoraGaConfig", "LoraSbConfig",
    "LoraXsConfig", "LorakitError",
    "OloraConfig", "PissaConfig", "RsLoraConfig", "TargetError", "TrainingError", "adapter_layers", "attach",
    "detach", "disabled", "export_peft", "get_method", "get_state", "hooks", "load", "merge",
    "merge_and_unload", "methods", "save", "trainable_parameters", "unmerge",
]
