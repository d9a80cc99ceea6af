"""Baselines with the same contract as ProxScoreOptimizer."""

from .advi import ADVI

__all__ = ["ADVI"]
