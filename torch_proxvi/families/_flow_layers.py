r"""The dense flow's univariate layers: zuko's monotone affine and rational-quadratic spline
transforms, with a derivative of the score that autograd forms cheaply.

Both zuko layers soft-clip their raw parameters :math:`u` (the hyper-networks' outputs),

.. math::
    u \mapsto \frac{u}{1 + |u| / c}, \qquad c = -\log(\text{slope})

(:math:`c/2` for the spline's widths and heights). The proximal step differentiates the flow's
score, itself a gradient in :math:`\theta` on which :math:`u` depends, so autograd differentiates
:math:`|u|` twice. torch's derivative of ``abs`` is :math:`\operatorname{sgn}(u)\,g`, and the
derivative of ``sgn`` an "efficient zero" tensor, whose addition to a gradient runs the sum's
shape inference in Python, several times per step of a small flow (docs/benchmarks.md, "The
dense flow's step").

Here :math:`|u| = u \cdot \operatorname{sign}(u)` with the sign a constant of the graph: the same
values and the same first derivative to the bit, and no second derivative formed (it is zero
almost everywhere, as ``abs``'s). Everything else, the transforms' maps, inverses and
log-determinants, is zuko's: these classes only recompute zuko's parameterisation, and
``tests/test_flow_layers.py`` checks them against zuko's own layers, to the bit, for values and
first and second derivatives.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from zuko.transforms import MonotonicAffineTransform, MonotonicRQSTransform, Transform

__all__ = ["Affine", "Spline"]


def _magnitude(u: Tensor) -> Tensor:
    """``abs(u)`` whose derivative is ``sign(u)`` held constant (no second derivative)."""
    return u * torch.sign(u.detach())


def _soft_clip(u: Tensor, bound: float) -> Tensor:
    """zuko's ``u / (1 + abs(u / bound))``."""
    return u / (1 + _magnitude(u / bound))


class Affine(MonotonicAffineTransform):
    """zuko's :class:`~zuko.transforms.MonotonicAffineTransform`: ``x * exp(log_scale) + shift``,
    its log-scale soft-clipped to ``|log_scale| < -log(slope)``."""

    def __init__(self, shift: Tensor, scale: Tensor, slope: float = 1e-3, **kwargs) -> None:
        Transform.__init__(self, **kwargs)
        self.shift = shift
        self.log_scale = _soft_clip(scale, math.log(slope))
        self.scale = self.log_scale.exp()


class Spline(MonotonicRQSTransform):
    """zuko's :class:`~zuko.transforms.MonotonicRQSTransform` on ``[-bound, bound]`` (the
    identity outside): bins from a softmax of the widths and heights, knot slopes
    ``exp(derivatives)``, each raw parameter soft-clipped first."""

    def __init__(self, widths: Tensor, heights: Tensor, derivatives: Tensor, bound: float = 5.0,
                 slope: float = 1e-3, **kwargs) -> None:
        Transform.__init__(self, **kwargs)
        # zuko writes abs(2 * w / log(slope)): the same operations in the same order
        widths = widths / (1 + _magnitude(2 * widths / math.log(slope)))
        heights = heights / (1 + _magnitude(2 * heights / math.log(slope)))
        derivatives = _soft_clip(derivatives, math.log(slope))

        widths = F.pad(F.softmax(widths, dim=-1), (1, 0), value=0)
        heights = F.pad(F.softmax(heights, dim=-1), (1, 0), value=0)
        derivatives = F.pad(derivatives, (1, 1), value=0)

        self.horizontal = bound * (2 * torch.cumsum(widths, dim=-1) - 1)
        self.vertical = bound * (2 * torch.cumsum(heights, dim=-1) - 1)
        self.derivatives = torch.exp(derivatives)
