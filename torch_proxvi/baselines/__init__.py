"""Baselines with the same contract as ProxScoreOptimizer: ADVI, GSM and BaM."""

from .advi import ADVI
from .bam import BaM
from .gsm import GSM

__all__ = ["ADVI", "GSM", "BaM"]
