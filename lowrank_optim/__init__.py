"""lowrank_optim: memory-efficient low-rank optimizers for PyTorch."""
from ._base import LowRankOptimizer
from ._groups import param_groups
from .galore import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit
from .fira import FiraAdamW
from .inner import GaLore
from .apollo import APOLLOAdamW, APOLLOAdamW8bit, APOLLOMini
from .hooks import register_hooks
from .fsdp import shard_placement_fn
from .loqt import LoQTAdamW, LoQTAdamW8bit, LoQTLinear, prepare_loqt
from .lowrank_backward import GaLoreLinear, prepare_galore
from .lr_qat import (IntLinear, LRQATLinear, export_lr_qat, lr_qat_param_groups,
                     prepare_lr_qat)
from .q_galore import QGaLoreAdamW8bit, QuantLinear, QuantWeight, quantize_weights
from ._layers import to_plain
from . import nn  # the layers, also as lowrank_optim.nn
from .projector import Projector
from .refresh import Exponential, FixedGap, LazyCosine

__version__ = "0.1.0"

__all__ = [
    "LowRankOptimizer", "GaLoreAdamW", "GaLoreAdamW8bit", "GaLoreAdafactor",
    "GaLore", "FiraAdamW", "APOLLOAdamW", "APOLLOAdamW8bit", "APOLLOMini",
    "QGaLoreAdamW8bit", "QuantWeight", "QuantLinear", "quantize_weights", "to_plain",
    "LoQTAdamW", "LoQTAdamW8bit", "LoQTLinear", "prepare_loqt",
    "LRQATLinear", "IntLinear", "prepare_lr_qat", "lr_qat_param_groups", "export_lr_qat",
    "GaLoreLinear", "prepare_galore",
    "param_groups", "register_hooks", "shard_placement_fn", "Projector", "FixedGap", "LazyCosine", "Exponential",
]
