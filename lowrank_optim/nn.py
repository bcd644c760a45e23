"""The methods' layers, re-exported (each lives beside its optimizer).

* :class:`QuantWeight`, :class:`QuantLinear`, :func:`quantize_weights` (Q-GaLore's INT8
  weights): :mod:`lowrank_optim.q_galore`.
* :class:`LoQTLinear`, :func:`prepare_loqt`: :mod:`lowrank_optim.loqt`.
* :func:`to_plain`: back to plain ``nn.Linear`` layers (:mod:`lowrank_optim._layers`).
"""
from ._layers import to_plain
from .loqt import LoQTLinear, prepare_loqt
from .q_galore import QuantLinear, QuantWeight, quantize_weights

__all__ = ["QuantWeight", "QuantLinear", "quantize_weights", "LoQTLinear", "prepare_loqt",
           "to_plain"]
