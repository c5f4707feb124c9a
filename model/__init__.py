"""moesaic.model: the single-device DeepSeek-V4-style MoE language model."""

from .transformer import ModelOutput, Transformer

__all__ = ["ModelOutput", "Transformer"]
