r"""Shared machinery of the batch score-based Gaussian baselines (GSM, BaM): a variational family.

Both fit a Gaussian :math:`q = N(m, \Sigma)` by closed-form updates from a batch of samples
:math:`z_k \sim q_t` and their scores :math:`g_k = \hat s(z_k)`; they differ only in the update
(``diagonal_update`` and ``dense_update`` of a :class:`BatchGaussian` family). The family has one
group key of its own, ``covariance``:

* ``"diagonal"``: per weight a 1-D Gaussian, state ``mean``, ``log_scale``, ``step``; the update
  acts on every coordinate separately. Usable on networks.
* ``"dense"``: one full covariance over all parameters of the group (at most
  :data:`MAX_DENSE_DIM` numbers), a joint family (:meth:`~BatchGaussian.is_joint`). Each parameter
  stores its rows of the group covariance as ``covariance`` of shape ``p.shape + (D,)``, so the
  state stays per parameter and a ``state_dict`` keeps torch's layout. Samples are drawn jointly
  with a Cholesky factor.

The per-sample scores are kept (K of them per parameter) because both updates are non-linear in
them. :class:`BatchGaussianVI` is the optimizer: ProxScoreOptimizer with the family fixed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._validation import _REQUIRED, _check
from ..families import Family, SkipStep
from ..families._proximal import ScoreSamples
from ..families.base import state_dtype
from ..kernels import gaussian as kernel
from ..kernels.noise import normal_
from ..optimizer import ProxScoreOptimizer

MAX_DENSE_DIM = 1000
_COVARIANCES = ("diagonal", "dense")


def symmetric_sqrt(matrix: Tensor) -> Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def _check_finite(tensors: list[Tensor], owner: str = "") -> None:
    """Refuse (:class:`SkipStep`) an update whose result is not finite; one sync."""
    if not bool(torch.stack([t.isfinite().all() for t in tensors]).all()):
        raise SkipStep(f"a non-finite result of {owner}'s closed-form update (scores too large for the "
                       f"state's dtype)", "Lower the learning rate, or check the loss's scale, if this repeats.")


def _offsets(group: dict) -> tuple[dict[Tensor, int], int]:
    offsets, total = {}, 0
    for p in group["params"]:
        offsets[p] = total
        total += p.numel()
    return offsets, total


class BatchGaussian(Family):
    """A Gaussian moved by a closed-form batch update; subclasses give the two updates."""

    variational = ("mean", "log_scale")
    mean_updates = ("score", "residual")
    options = {"covariance": "diagonal"}
    #: the optimizer that owns the family (its name in error messages)
    owner = ""
    may_skip = True

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls.rules = (cls.name,)

    def is_joint(self, group):
        return group["covariance"] == "dense"

    def validate_lr(self, lr) -> None:
        """Subclasses narrow the admissible learning rates."""

    def validate(self, group):
        super().validate(group)
        self.validate_lr(group["lr"])
        _check(group["covariance"] in _COVARIANCES, "covariance", group["covariance"], f"choose one of {_COVARIANCES}")
        if group["covariance"] != "dense":
            return
        dim = sum(p.numel() for p in group["params"])
        if dim > MAX_DENSE_DIM:
            raise ValueError(
                f"{self.owner} with covariance='dense' is limited to {MAX_DENSE_DIM} dimensions per parameter "
                f"group, got {dim}: use covariance='diagonal' for networks, or give only a small layer its own "
                f"dense group")
        if len({(p.device, p.dtype) for p in group["params"]}) > 1:
            raise ValueError(f"{self.owner} with covariance='dense' needs all parameters of a group on one device "
                             f"with one dtype: split the group")

    # ------------------------------------------------------------------ storage
    def init_state(self, state, p, group):
        mean = p.detach().to(state_dtype(p), copy=True)
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["mean"] = mean
        if group["covariance"] == "diagonal":
            state["log_scale"] = torch.full_like(mean, math.log(group["init_std"]))
            return
        offsets, dim = _offsets(group)
        rows = torch.zeros(p.numel(), dim, dtype=mean.dtype, device=mean.device)
        index = torch.arange(p.numel(), device=mean.device)
        rows[index, index + offsets[p]] = group["init_std"] ** 2
        state["covariance"] = rows.reshape(*p.shape, dim)

    def state_shape(self, p, key, group):
        if key == "covariance" and group["covariance"] == "dense":
            return (*p.shape, _offsets(group)[1])
        return tuple(p.shape)

    @staticmethod
    def _joint(states: list[dict]) -> tuple[Tensor, Tensor]:
        """The group's mean [D] and covariance [D, D] assembled from its parameters' state."""
        mean = torch.cat([st["mean"].reshape(-1) for st in states])
        cov = torch.cat([st["covariance"].reshape(st["mean"].numel(), st["covariance"].shape[-1]) for st in states])
        return mean, cov

    # ------------------------------------------------------------------ the density
    def sample(self, group, params, states, generator, count=None, *, path="single"):
        if group["covariance"] == "diagonal":
            out = []
            for st in states:
                m = st["mean"]
                shape = m.shape if count is None else (count, *m.shape)
                out.append(kernel.sample(st, normal_(torch.empty(shape, dtype=m.dtype, device=m.device), generator)))
            return out
        mean, cov = self._joint(states)
        factor, info = torch.linalg.cholesky_ex(cov)
        if int(info):  # numerically semi-definite: fall back to the symmetric root
            factor = symmetric_sqrt(cov)
        shape = mean.shape if count is None else (count, *mean.shape)
        noise = torch.randn(shape, generator=generator, device=mean.device, dtype=mean.dtype)
        flat = mean + noise @ factor.T
        sizes = [st["mean"].numel() for st in states]
        return [part.reshape(flat.shape[:-1] + st["mean"].shape) for part, st in zip(flat.split(sizes, -1), states)]

    def mean(self, group, params, states):
        return [st["mean"] for st in states]

    def std(self, group, params, states):
        if group["covariance"] == "diagonal":
            return [kernel.std(st) for st in states]
        offsets = _offsets(group)[0]
        out = []
        for p, st in zip(params, states):
            rows = st["covariance"].reshape(p.numel(), st["covariance"].shape[-1])
            index = torch.arange(p.numel(), device=rows.device)
            out.append(rows[index, index + offsets[p]].clamp_min(0).sqrt().view_as(p))
        return out

    # ------------------------------------------------------------------ the step
    def collect(self, group, state, theta, score, acc, weight):
        return ScoreSamples.collect(acc, theta, score)

    def update(self, group, states, accs, *, generator, path="single"):
        """The closed-form update, computed aside and checked before anything is written: a result
        that is not finite, or a decomposition that fails, raises :class:`SkipStep` (the optimizer
        skips the step and nothing changes)."""
        if group["covariance"] == "diagonal":
            results = [self.diagonal_update(state["mean"], kernel.std(state) ** 2, torch.stack(st.theta),
                                            torch.stack(st.score), group["lr"]) for state, st in zip(states, accs)]
            _check_finite([t for pair in results for t in pair], self.owner)
            for state, (new_mean, new_var) in zip(states, results):
                state["step"] += 1
                state["mean"].copy_(new_mean)
                state["log_scale"].copy_(0.5 * new_var.clamp_min(1e-300).log()).clamp_(
                    kernel.LOG_SCALE_MIN, kernel.LOG_SCALE_MAX)
            return
        mean, cov = self._joint(states)   # a dense group steps as a whole, in group order
        theta = torch.stack([torch.cat([st.theta[k].reshape(-1) for st in accs]) for k in range(len(accs[0].theta))])
        score = torch.stack([torch.cat([st.score[k].reshape(-1) for st in accs]) for k in range(len(accs[0].score))])
        try:
            new_mean, new_cov = self.dense_update(mean, cov, theta, score, group["lr"])
        except torch.linalg.LinAlgError as error:
            raise SkipStep(f"a failed decomposition in {self.owner}'s dense update ({str(error).splitlines()[0]}), "
                           f"likely scores too large for {str(mean.dtype).removeprefix('torch.')}",
                           "Lower the learning rate, or use float64 parameters, if this repeats.") from None
        new_cov = 0.5 * (new_cov + new_cov.T)
        _check_finite([new_mean, new_cov], self.owner)
        start = 0
        for st in states:
            n = st["mean"].numel()
            st["step"] += 1
            st["mean"].copy_(new_mean[start:start + n].view_as(st["mean"]))
            st["covariance"].copy_(new_cov[start:start + n].view_as(st["covariance"]))
            start += n

    def diagonal_update(self, mean: Tensor, var: Tensor, theta: Tensor, score: Tensor,
                        lr: float) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def dense_update(self, mean: Tensor, cov: Tensor, theta: Tensor, score: Tensor,
                     lr: float) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class BatchGaussianVI(ProxScoreOptimizer):
    """Base of GSM and BaM: ProxScoreOptimizer whose groups use the family ``family_name``."""

    family_name = ""

    def __init__(self, params, lr: float = 1.0, *, dataset_size: float = _REQUIRED,
                 prior_precision: float = 1.0, prior_mean: str = "zero",
                 covariance: str = "diagonal", init_std: float = 1e-3, mc_samples: int = 1,
                 temperature: float = 1.0, generator: torch.Generator | None = None,
                 foreach: bool | None = None):
        super().__init__(params, lr, dataset_size=dataset_size, prior_precision=prior_precision,
                         prior_mean=prior_mean, family=self.family_name, init_std=init_std, mc_samples=mc_samples,
                         inner_steps=1, prox_weight=0.0, temperature=temperature, generator=generator,
                         foreach=foreach, compiled=False, covariance=covariance)

    def add_param_group(self, param_group) -> None:
        family = param_group.get("family", self.family_name)
        if family != self.family_name:
            raise ValueError(f"Invalid family: {family!r} ({type(self).__name__} fits a Gaussian; use "
                             f"ProxScoreOptimizer for family={family!r})")
        super().add_param_group(param_group)
