"""torch_proxvi: Bayesian deep learning as a drop-in torch.optim optimizer.

>>> from torch_proxvi import ProxScoreOptimizer
"""

from . import checkpoint_io, metrics
from .baselines import ADVI, GSM, BaM
from .optimizer import ProxScoreOptimizer
from .predictive import predictive

__all__ = ["ProxScoreOptimizer", "ADVI", "GSM", "BaM", "checkpoint_io", "metrics", "predictive"]
__version__ = "0.1.0"
