"""The library of flows; importing this package registers them all."""

from .centroid import Centroid
from .double_sparsity import DoubleSparsity
from .lowbit import LowBit
from .oracle import Oracle
from .quest import Quest
from .streaming import Streaming

__all__ = ["Centroid", "DoubleSparsity", "LowBit", "Oracle", "Quest", "Streaming"]
