"""Fusion methods, one module per family; see :mod:`.registry`."""
from .registry import FusionMethod, all_methods, get_method, method_names, register, register_function

__all__ = ["FusionMethod", "all_methods", "get_method", "method_names", "register", "register_function"]
