"""Int8 quantization: calibration, per-target policy, static QDQ and dynamic passes."""

from .dynamic import DynamicQuantizePass
from .static import StaticQuantizePass

__all__ = ["DynamicQuantizePass", "StaticQuantizePass"]
