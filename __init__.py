"""moesaic: DeepSeek-V4-style Mixture-of-Experts training with compressed attention on DeepSpeed."""

__version__ = "0.1.0"
