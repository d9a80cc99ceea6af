"""Variational families: how each stores, samples, scores and updates its per-parameter state.

The protocol is :class:`~torch_proxvi.families.base.Family`; the group key ``family`` names one:

* ``"gaussian"``: mean-field Gaussian, closed-form update (:mod:`.gaussian`);
* ``"elementwise_flow"``: a sinh-arcsinh transform of a Gaussian per weight (:mod:`.sinh_arcsinh`);
* ``"flow"``: a dense spline flow (zuko) over a small parameter group (:mod:`.flow`).
"""

from . import flow, gaussian, sinh_arcsinh
from .base import Family, SkipStep, get, names, register, sample_and_score, start_std, state_dtype

__all__ = ["Family", "SkipStep", "get", "names", "register", "sample_and_score", "start_std", "state_dtype", "flow",
           "gaussian", "sinh_arcsinh"]
