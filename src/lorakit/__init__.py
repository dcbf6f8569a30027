"""lorakit: the modern family of low-rank fine-tuning methods, one API, faithful to the papers."""

from .api import (active_adapter, adapter_layers, adapter_names, attach, detach, disabled, get_state, hooks, merge,
                  merge_and_unload, set_active, trainable_parameters, unmerge, use_adapter)
from .config import AdapterConfig
from .core.registry import get_method
from .errors import AdapterFileError, ConfigError, LorakitError, TargetError, TrainingError
from .io.peft_export import export_peft
from .io.persistence import load, save
from .methods.ba_lora import BaLoraConfig
from .methods.bone import BoneConfig
from .methods.cola import ColaConfig
from .methods.dora import DoraConfig
from .methods.flat_lora import FlatLoraConfig
from .methods.glora import GloraConfig
from .methods.lora import LoraConfig, RsLoraConfig
from .methods.lora_ga import LoraGaConfig
from .methods.lora_plus import LoraPlusConfig
from .methods.lora_pro import LoraProConfig
from .methods.lora_rite import LoraRiteConfig
from .methods.lora_sb import LoraSbConfig
from .methods.lora_xs import LoraXsConfig
from .methods.olora import OloraConfig
from .methods.pissa import PissaConfig
from .methods.xgblora import XgbLoraConfig
from .methods.adalora import AdaLoraConfig
from .methods.alora import AloraConfig
from .methods.dylora import DyLoraConfig
from .methods.lora2 import Lora2Config
from .methods.prilora import PriLoraConfig
from .methods.sora import SoraConfig

from .weighted import WeightedAdapter, add_weighted_adapter

# Bound last on purpose: importing the `lorakit.methods` subpackage (above) sets the attribute
# `lorakit.methods` to that package; the public name is the registry function.
from .core.registry import methods  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "AdaLoraConfig", "AloraConfig", "DyLoraConfig", "Lora2Config", "PriLoraConfig", "SoraConfig",
    "BaLoraConfig", "BoneConfig", "ColaConfig", "DoraConfig", "FlatLoraConfig", "LoraPlusConfig", "LoraProConfig",
    "GloraConfig", "LoraRiteConfig", "XgbLoraConfig",
    "AdapterConfig", "AdapterFileError", "ConfigError", "LoraConfig", "LoraGaConfig", "LoraSbConfig",
    "LoraXsConfig", "LorakitError", "WeightedAdapter",
    "OloraConfig", "PissaConfig", "RsLoraConfig", "TargetError", "TrainingError", "active_adapter",
    "adapter_layers", "adapter_names", "add_weighted_adapter", "attach", "detach", "disabled", "export_peft",
    "get_method", "get_state", "hooks", "load", "merge", "merge_and_unload", "methods", "save", "set_active",
    "trainable_parameters", "unmerge", "use_adapter",
]
