r"""The variational-family protocol: what :class:`~torch_proxvi.ProxScoreOptimizer` asks of a family.

A family owns the per-parameter ``state`` entries that describe :math:`q_\phi(\theta)` (plain
tensors, float32 or float64 whatever the weights' dtype) and answers five questions about them:

* **storage**: :meth:`Family.init_state` fills the state at a parameter's first step (the mean at
  the current weights, the scale at ``init_std``, every other shape parameter at its Gaussian
  value), :meth:`Family.state_shape` gives each entry's shape (checked when a ``state_dict`` is
  loaded);
* **sampling**: :meth:`Family.sample` draws :math:`\theta \sim q` from a ``torch.Generator``;
* **density**: :meth:`Family.log_prob` and its score :meth:`Family.score`
  :math:`\nabla_\theta \log q(\theta)`, and :meth:`Family.kl` :math:`\mathrm{KL}(q \,\|\, q')`
  between two states (closed form where it exists, Monte Carlo otherwise);
* **summaries**: :meth:`Family.mean` and :meth:`Family.std`, the marginal mean and standard
  deviation of each weight (what ``mean_params()`` and ``posterior_std`` report);
* **the step**: :meth:`Family.collect` accumulates what the update needs from each of the K
  samples and its score estimate :math:`\hat s`, and :meth:`Family.update` moves the state toward
  the target of the group's ``rule`` (see docs/method.md); :meth:`Family.step` is the common
  step of a training loop (K = 1, the gradient in ``p.grad``, the next sample written into the
  weights), which a family may run on a fast path of its own (the Gaussian's goes through
  :mod:`torch_proxvi.kernels.dispatch`). ``path`` (``"single"``, ``"flat"`` or ``"compiled"``)
  is the optimizer's choice of implementation; a family that has only one ignores it.

Element-wise families answer for one parameter at a time; a joint family (:meth:`Family.is_joint`,
e.g. a dense flow) describes all parameters of a group together, so its methods take and return
lists in the group's parameter order. Families are stateless singletons looked up
by name with :func:`get`; the optimizer's group key ``family`` names one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..kernels import StepHyper, score
from ..kernels.gaussian import STD_RANGE
from ..kernels.noise import is_dtensor

__all__ = ["Family", "SkipStep", "START_OPTIONS", "curvature_init_std", "get", "names", "register", "sample_and_score",
           "start_std", "state_dtype", "weight_tensors"]


class SkipStep(ArithmeticError):
    """Raised by a family's ``update`` (or ``step``) *before it changes anything* when the step's
    result would not be finite (or a decomposition it needs fails); the optimizer then skips the
    step, restores weights and RNG, warns and counts it in ``skipped_steps``. Its arguments:
    what happened (a clause: "...skipped a step because of <it>") and, optionally, what to do."""


def state_dtype(p: Tensor) -> torch.dtype:
    """float64 for float64 weights, float32 for everything else (bf16/fp16 included)."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def sample_and_score(group: dict, p: Tensor, state: dict) -> tuple[Tensor, Tensor]:
    """The sample in ``p`` (in the state dtype, a copy) and its score estimate from ``p.grad``."""
    theta = p.detach().to(state_dtype(p), copy=True)
    return theta, score(p.grad.to(theta.dtype), theta, state.get("prior_mean"), StepHyper.of(group, 0.0))


def curvature_init_std(group: dict[str, Any]) -> float:
    r"""The data-driven start :math:`P_0^{-1/2}`, :math:`P_0 = N h_0 / T + \lambda_0`: the precision
    of a posterior whose every one of the N examples adds curvature ``init_curvature``
    :math:`h_0` (tempered by T) to the prior's :math:`\lambda_0`, so :math:`\sigma_0` follows the
    dataset size and the prior instead of being a constant. A start the state cannot hold is refused
    here, naming ``init_curvature`` (the number the user gave)."""
    precision = group["dataset_size"] * group["init_curvature"] / group["temperature"] + group["prior_precision"]
    std = float(precision) ** -0.5
    low, high = STD_RANGE
    if not low <= std <= high:
        raise ValueError(f"Invalid init_curvature: {group['init_curvature']!r} (the start it gives, (dataset_size * "
                         f"init_curvature / temperature + prior_precision) ** -0.5 = {std:.3g}, is outside "
                         f"[{low:.3g}, {high:.3g}], where the scale is kept: choose an init_curvature nearer 1, "
                         f"or give init_std)")
    return std


#: the group keys of the data-driven start (:func:`curvature_init_std`, :func:`start_std`), which
#: every family whose ``init_state`` calls :func:`start_std` declares in its ``options``
START_OPTIONS: dict[str, Any] = {"init_curvature": None, "relative_init_curvature": None}


def start_std(group: dict[str, Any], p: Tensor) -> float:
    r"""The start :math:`\sigma_0` of tensor ``p`` (its weights now: the mean's start).

    With ``relative_init_curvature`` :math:`\kappa` (a per-example curvature guess in units of
    the tensor's own scale) and ``p`` a weight tensor of two or more dimensions whose root mean
    square :math:`r` is finite and positive: :math:`(N \kappa / (T r^2) + \lambda_0)^{-1/2}`,
    clamped to the range the state holds. Otherwise (biases and normalisation gains, all-zero
    tensors, no :math:`\kappa`): the group's ``init_std``."""
    kappa = group.get("relative_init_curvature")
    if kappa is None or p.dim() < 2 or p.numel() == 0:
        return float(group["init_std"])
    norm = torch.linalg.vector_norm(p.detach(), dtype=state_dtype(p))
    if is_dtensor(norm):        # a sharded weight (FSDP2): the whole tensor's norm, the same on every rank
        norm = norm.full_tensor()
    norm = float(norm)
    mean_square = norm * norm / p.numel()
    if not 0 < mean_square < float("inf"):
        return float(group["init_std"])
    precision = group["dataset_size"] * kappa / (group["temperature"] * mean_square) + group["prior_precision"]
    low, high = STD_RANGE
    return min(max(precision ** -0.5, low), high)


def weight_tensors(params) -> int:
    """How many of ``params`` are trained weight tensors: two or more dimensions (weight matrices,
    convolution kernels, embeddings; not biases or normalisation gains) and ``requires_grad``."""
    return sum(1 for p in params if p.dim() >= 2 and p.requires_grad)


def sum_weights(values: Tensor, like: Tensor) -> Tensor:
    """Sum ``values`` (shape ``batch + like.shape``) over the dimensions of ``like``."""
    return values.sum(dim=tuple(range(values.dim() - like.dim(), values.dim()))) if like.dim() else values


class Family:
    """Base class of the variational families; see the module docstring for the protocol.

    Every method takes the parameter ``group`` (the optimizer's group dict, for hyperparameters),
    the parameters ``params`` and their ``states`` (lists in group order; one entry each for an
    element-wise family called per parameter).
    """

    name: str = ""
    joint: bool = False
    #: state entries that are the variational parameters (the rest are Adam moments and ``step``)
    variational: tuple[str, ...] = ()
    #: the ``mean_update`` rules the family supports; the first is its default
    mean_updates: tuple[str, ...] = ("score", "residual")
    #: ``scale_lr_ratio`` when the group leaves it None
    scale_lr_ratio: float = 1.0
    #: the ``rule`` values the family supports; the first is its default
    rules: tuple[str, ...] = ("proximal",)
    #: group keys of the family's own, with their defaults (optimizer keyword arguments too)
    options: dict[str, Any] = {}
    #: whether ``update`` may raise :class:`SkipStep` (the optimizer then keeps a copy of the
    #: state of a step with several batches, so that a later batch's refusal undoes the earlier)
    may_skip: bool = False

    def is_joint(self, group: dict[str, Any]) -> bool:
        """Whether the family models all parameters of ``group`` together."""
        return self.joint

    # ---------------------------------------------------------------- storage
    def validate(self, group: dict[str, Any]) -> None:
        """Raise ValueError (naming the fix) if ``group`` cannot use this family; resolve
        ``mean_update=None`` and ``scale_lr_ratio=None`` to the family's defaults."""
        if group["scale_lr_ratio"] is None:
            group["scale_lr_ratio"] = self.scale_lr_ratio
        if group.get("rule") is None:
            group["rule"] = self.rules[0]
        if group["rule"] not in self.rules:
            raise ValueError(f"Invalid rule: {group['rule']!r} (family={self.name!r} supports {self.rules})")
        for key, default in self.options.items():
            group.setdefault(key, default)
        if group["init_std"] is None:
            group["init_std"] = self.default_init_std(group)
        if group["mean_update"] is None:
            group["mean_update"] = self.mean_updates[0]
        if group["mean_update"] not in self.mean_updates:
            raise ValueError(
                f"Invalid mean_update: {group['mean_update']!r} (family={self.name!r} supports "
                f"{self.mean_updates}; {self._mean_update_note})")

    _mean_update_note = ""

    def default_init_std(self, group: dict[str, Any]) -> float:
        """``init_std`` when the group leaves it None: the data-driven start
        (:func:`curvature_init_std`) where the group gives ``init_curvature``, else 1e-3."""
        return curvature_init_std(group) if group.get("init_curvature") is not None else 1e-3

    def init_state(self, state: dict, p: Tensor, group: dict) -> None:
        """Fill ``state`` for parameter ``p`` of ``group`` at its first step."""
        raise NotImplementedError

    def state_shape(self, p: Tensor, key: str, group: dict) -> tuple[int, ...]:
        """The shape of the state entry ``key`` of ``p`` (default: the parameter's shape)."""
        return tuple(p.shape)

    # ---------------------------------------------------------------- the density
    def sample(self, group: dict, params: list[Tensor], states: list[dict],
               generator: torch.Generator | None, count: int | None = None, *,
               path: str = "single") -> list[Tensor]:
        """One draw :math:`\\theta \\sim q` per parameter (state dtype, the parameters' shapes),
        or ``count`` draws stacked along a new first dimension (``path``: the optimizer's, for a
        family with a compiled sampler; same draws)."""
        raise NotImplementedError

    def log_prob(self, group: dict, states: list[dict], thetas: list[Tensor]) -> Tensor:
        """:math:`\\log q(\\theta)` summed over all weights of ``thetas``: a scalar, or one value
        per sample when every tensor has the same leading batch dimensions."""
        raise NotImplementedError

    def score(self, group: dict, states: list[dict], thetas: list[Tensor]) -> list[Tensor]:
        """:math:`\\nabla_\\theta \\log q(\\theta)` for each tensor of ``thetas`` (leading batch
        dimensions allowed)."""
        raise NotImplementedError

    def kl(self, group: dict, states: list[dict], others: list[dict],
           generator: torch.Generator | None = None) -> Tensor:
        """:math:`\\mathrm{KL}(q \\,\\|\\, q')` of ``states`` to ``others`` summed over weights."""
        raise NotImplementedError

    def mean(self, group: dict, params: list[Tensor], states: list[dict]) -> list[Tensor]:
        """The marginal mean of every weight."""
        raise NotImplementedError

    def std(self, group: dict, params: list[Tensor], states: list[dict]) -> list[Tensor]:
        """The marginal standard deviation of every weight."""
        raise NotImplementedError

    # ---------------------------------------------------------------- the step
    def collect(self, group: dict, state: dict, theta: Tensor, score: Tensor, acc: Any,
                weight: float) -> Any:
        """Add one sample ``theta`` and its score estimate (weight ``1/K``) to ``acc`` (None at
        the first sample); return the accumulator. It must have a ``probe`` tensor that is
        non-finite wherever a score was."""
        raise NotImplementedError

    def update(self, group: dict, states: list[dict], accs: list[Any], *,
               generator: torch.Generator | None, path: str = "single") -> None:
        """One step of ``states`` (all at the same step count) from the accumulators."""
        raise NotImplementedError

    def step(self, group: dict, params: list[Tensor], states: list[dict], generator: torch.Generator,
             *, path: str) -> None:
        """The common step: update ``states`` from the sample in ``params`` and its gradient in
        ``p.grad`` (K = 1; same device, state dtype and step count), then write a fresh sample
        into ``params``. By default :meth:`collect`, :meth:`update` and :meth:`sample`."""
        accs = [self.collect(group, st, *sample_and_score(group, p, st), None, 1.0)
                for p, st in zip(params, states)]
        self.update(group, states, accs, generator=generator, path=path)
        with torch.no_grad():
            for p, value in zip(params, self.sample(group, params, states, generator, path=path)):
                p.copy_(value)


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Make ``family`` available as the group key ``family=family.name``."""
    _REGISTRY[family.name] = family
    return family


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get(name: str) -> Family:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"Invalid family: {name!r} (choose one of {names()})") from None
