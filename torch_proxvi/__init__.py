"""torch_proxvi: Bayesian deep learning as a drop-in torch.optim optimizer.

>>> from torch_proxvi import ProxScoreOptimizer
"""

from . import metrics
from .optimizer import ProxScoreOptimizer
from .predictive import predictive

__all__ = ["ProxScoreOptimizer", "metrics", "predictive"]
__version__ = "0.1.0"
