r"""Shared machinery of the batch score-based Gaussian baselines (GSM, BaM).

Both fit a Gaussian :math:`q = N(m, \Sigma)` by closed-form updates from a batch of samples
:math:`z_k \sim q_t` and their scores :math:`g_k = \hat s(z_k)`; they differ only in the update.
This module holds what they share with :class:`~torch_proxvi.ProxScoreOptimizer` and add to it:

* ``covariance="diagonal"`` (a group key): per weight a 1-D Gaussian, state ``mean``,
  ``log_scale``, ``step``; the update acts on every coordinate separately. Usable on networks.
* ``covariance="dense"``: one full covariance over all parameters of the group (at most
  :data:`MAX_DENSE_DIM` numbers). Each parameter stores its rows of the group covariance as
  ``covariance`` of shape ``p.shape + (D,)``, so the state stays per parameter and a
  ``state_dict`` keeps torch's layout. Samples are drawn jointly with a Cholesky factor.

The per-sample scores are kept (K of them per parameter) because both updates are non-linear
in them. A subclass implements ``_diagonal_update`` and ``_dense_update``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _functional as F
from .._validation import _REQUIRED, _check
from ..families import gaussian
from ..families._proximal import ScoreSamples
from ..optimizer import ProxScoreOptimizer

MAX_DENSE_DIM = 1000
_COVARIANCES = ("diagonal", "dense")



def symmetric_sqrt(matrix: Tensor) -> Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


class BatchGaussianVI(ProxScoreOptimizer):
    """Base of GSM and BaM: a Gaussian posterior moved by a closed-form batch update."""

    _families = ("gaussian",)

    def __init__(self, params, lr: float = 1.0, *, dataset_size: float = _REQUIRED,
                 prior_precision: float = 1.0, prior_mean: str = "zero",
                 covariance: str = "diagonal", init_std: float = 1e-3, mc_samples: int = 1,
                 temperature: float = 1.0, generator: torch.Generator | None = None,
                 foreach: bool | None = None):
        self._covariance = covariance
        super().__init__(params, lr, dataset_size=dataset_size, prior_precision=prior_precision,
                         prior_mean=prior_mean, init_std=init_std, mc_samples=mc_samples,
                         inner_steps=1, prox_weight=0.0, temperature=temperature,
                         generator=generator, foreach=foreach)

    def _extra_defaults(self):
        return {"covariance": self._covariance}

    def _validate_lr(self, lr) -> None:
        """Subclasses narrow the admissible learning rates."""

    def add_param_group(self, param_group) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_lr(group["lr"])
            _check(group["covariance"] in _COVARIANCES, "covariance", group["covariance"],
                   f"choose one of {_COVARIANCES}")
            if group["covariance"] == "dense":
                self._validate_dense(group)
        except ValueError:
            self.param_groups.pop()
            for p in group["params"]:
                self.state.pop(p, None)
            raise

    def _validate_dense(self, group: dict) -> None:
        name = type(self).__name__
        dim = sum(p.numel() for p in group["params"])
        if dim > MAX_DENSE_DIM:
            raise ValueError(
                f"{name} with covariance='dense' is limited to {MAX_DENSE_DIM} dimensions per "
                f"parameter group, got {dim}: use covariance='diagonal' for networks, or give "
                f"only a small layer its own dense group")
        if len({(p.device, p.dtype) for p in group["params"]}) > 1:
            raise ValueError(f"{name} with covariance='dense' needs all parameters of a group "
                             f"on one device with one dtype: split the group")

    # ------------------------------------------------------------------ layout and state
    @staticmethod
    def _offsets(group: dict) -> tuple[dict[Tensor, int], int]:
        offsets, total = {}, 0
        for p in group["params"]:
            offsets[p] = total
            total += p.numel()
        return offsets, total

    def _init_state(self, state: dict, p: Tensor, group: dict) -> None:
        mean = p.detach().to(gaussian.state_dtype(p), copy=True)
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["mean"] = mean
        if group["covariance"] == "diagonal":
            state["log_scale"] = torch.full_like(mean, math.log(group["init_std"]))
            return
        offsets, dim = self._offsets(group)
        rows = torch.zeros(p.numel(), dim, dtype=mean.dtype, device=mean.device)
        index = torch.arange(p.numel(), device=mean.device)
        rows[index, index + offsets[p]] = group["init_std"] ** 2
        state["covariance"] = rows.reshape(*p.shape, dim)

    def _state_shape(self, p: Tensor, key: str) -> tuple[int, ...]:
        group = self._group_of(p)
        if key == "covariance" and group["covariance"] == "dense":
            return (*p.shape, self._offsets(group)[1])
        return tuple(p.shape)

    def _dense_groups(self, pairs) -> tuple[list, dict[int, list[Tensor]]]:
        """Split ``pairs`` into diagonal pairs and the dense groups' parameter lists."""
        diagonal, dense = [], {}
        for group, p in pairs:
            if group["covariance"] == "dense":
                dense.setdefault(id(group), (group, []))[1].append(p)
            else:
                diagonal.append((group, p))
        return diagonal, dense

    def _joint(self, params: list[Tensor]) -> tuple[Tensor, Tensor]:
        """The group's mean [D] and covariance [D, D] assembled from its parameters' state."""
        mean = torch.cat([self.state[p]["mean"].reshape(-1) for p in params])
        cov = torch.cat([self.state[p]["covariance"].reshape(p.numel(), -1) for p in params])
        return mean, cov

    def _split(self, params: list[Tensor], mean: Tensor, cov: Tensor) -> None:
        start = 0
        for p in params:
            n = p.numel()
            self.state[p]["mean"].copy_(mean[start:start + n].view_as(p))
            self.state[p]["covariance"].copy_(cov[start:start + n].view(*p.shape, -1))
            start += n

    # ------------------------------------------------------------------ sampling
    def _draw(self, pairs, generator_of):
        diagonal, dense = self._dense_groups(pairs)
        out = super()._draw(diagonal, generator_of)
        for _, params in dense.values():
            mean, cov = self._joint(params)
            factor, info = torch.linalg.cholesky_ex(cov)
            if int(info):  # numerically semi-definite: fall back to the symmetric root
                factor = symmetric_sqrt(cov)
            noise = torch.randn(mean.shape, generator=generator_of(mean.device),
                                device=mean.device, dtype=mean.dtype)
            flat = mean + factor @ noise
            start = 0
            for p in params:
                out[p] = flat[start:start + p.numel()].view_as(p)
                start += p.numel()
        return out

    def _std(self, p: Tensor, state: dict) -> Tensor:
        if "covariance" not in state:
            return gaussian.std(state)
        group = self._group_of(p)
        offset = self._offsets(group)[0][p]
        rows = state["covariance"].reshape(p.numel(), -1)
        index = torch.arange(p.numel(), device=rows.device)
        return rows[index, index + offset].clamp_min(0).sqrt().view_as(p)

    # ------------------------------------------------------------------ the step
    def _check_work(self, work) -> None:
        super()._check_work(work)
        _, dense = self._dense_groups(work)
        for group, params in dense.values():
            if len(params) != len(group["params"]):
                raise RuntimeError(
                    f"{type(self).__name__} with covariance='dense' needs a gradient for every "
                    f"parameter of the group ({len(params)} of {len(group['params'])} have one): "
                    f"set requires_grad=False on unused parameters before building the optimizer")

    def _score_stats(self, group, p, grad, state, stats, weight):
        theta, s = self._theta_and_score(group, p, grad, state, copy=True)
        if stats is None:
            stats = ScoreSamples([], [])
        stats.theta.append(theta)
        stats.score.append(s)
        return stats

    def _update_batch(self, group: dict, states: list[dict], stats: list[ScoreSamples]) -> None:
        for state in states:
            state["step"] += 1
        if group["covariance"] == "diagonal":
            for state, st in zip(states, stats):
                var = torch.exp(2 * state["log_scale"])
                new_mean, new_var = self._diagonal_update(
                    state["mean"], var, torch.stack(st.theta), torch.stack(st.score), group["lr"])
                state["mean"].copy_(new_mean)
                state["log_scale"].copy_(0.5 * new_var.clamp_min(1e-300).log()).clamp_(
                    F.LOG_SCALE_MIN, F.LOG_SCALE_MAX)
            return
        params = group["params"]  # a dense group steps as a whole, in group order
        mean, cov = self._joint(params)
        theta = torch.stack([torch.cat([st.theta[k].reshape(-1) for st in stats])
                             for k in range(len(stats[0].theta))])
        score = torch.stack([torch.cat([st.score[k].reshape(-1) for st in stats])
                             for k in range(len(stats[0].score))])
        new_mean, new_cov = self._dense_update(mean, cov, theta, score, group["lr"])
        self._split(params, new_mean, 0.5 * (new_cov + new_cov.T))

    def _diagonal_update(self, mean: Tensor, var: Tensor, theta: Tensor, score: Tensor,
                         lr: float) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _dense_update(self, mean: Tensor, cov: Tensor, theta: Tensor, score: Tensor,
                      lr: float) -> tuple[Tensor, Tensor]:
        raise NotImplementedError
