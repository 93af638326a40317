"""vFlow: sparse-attention algorithms as small traced programs over page-centric tensors."""

from .lowering import find_lowering, register_lowering, registered_lowerings, unregister_lowering

__all__ = ["find_lowering", "register_lowering", "registered_lowerings", "unregister_lowering"]
