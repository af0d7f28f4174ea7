"""From-scratch PaliGemma 1 and 2 in PyTorch (installed as `pgexport.models`)."""

from pgexport.models.config import PRESETS, PaliGemmaConfig, TextConfig, VisionConfig
from pgexport.models.paligemma import PaliGemma

__all__ = ["PRESETS", "PaliGemma", "PaliGemmaConfig", "TextConfig", "VisionConfig"]
