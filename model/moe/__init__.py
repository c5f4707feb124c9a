"""Mixture-of-experts FFN, split by concern: router, dispatcher, experts, layer."""

from .dispatcher import LocalDispatcher
from .experts import GroupedExperts
from .layer import MoE
from .router import Router, RouterOutput

__all__ = ["GroupedExperts", "LocalDispatcher", "MoE", "Router", "RouterOutput"]
