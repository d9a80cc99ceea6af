r"""Dense flow family: a neural spline flow (zuko) over all weights of a small parameter group.

``family="flow"``. The group's D weights, flattened in group order, are

.. math::
    \theta = m + \sigma \odot T_\psi^{-1}(z), \qquad z \sim N(0, I_D),

where :math:`T_\psi` alternates affine and monotone rational-quadratic spline coupling layers
(zuko's masked autoregressive transforms with ``passes=2``: each half of the coordinates is
transformed with parameters predicted from the other half, halves alternating). It captures
correlations, skew, heavy tails and multiple modes that the mean-field families cannot. It
starts at the identity (the hyper networks' last layers are zero), so
:math:`q_0 = N(\text{weights}, \text{init\_std}^2 I)` as for the Gaussian family. The
log-density is the change of variables

.. math::
    \log q(\theta) = \log N(T_\psi(y); 0, I) + \log|\det \partial T_\psi / \partial y|
                     - \textstyle\sum_i \log\sigma_i, \qquad y = (\theta - m)/\sigma,

and the score :math:`\nabla_\theta \log q` is taken by autograd, so the proximal step
(:mod:`torch_proxvi.families._proximal`, :math:`D_t = \sigma_t`, full residual) differentiates
through it a second time. No reparameterised gradient of the model is ever needed.

State: every parameter of the group stores its slice of ``loc`` (:math:`m`) and ``log_scale``
(:math:`\log\sigma`); the group's first parameter also stores ``flow``, the flow's weights as one
flat vector (their layout is the zuko modules built from the group's ``flow_options``). Each has
Adam moments ``<name>_exp_avg_sq`` (and ``<name>_exp_avg`` when ``betas[0] > 0``). The flow's
weights learn at ``lr * flow_options["lr_ratio"]`` (0.1: at the location's rate the flow ran
away on correlated and banana targets) and stay fixed during ``warmup_steps`` and the first
``flow_options["delay"]`` steps (500), while the log-scales learn at 10x ``lr`` (the family's
``scale_lr_ratio``). From a start far narrower than the posterior the network otherwise grew to
carry the scale, slowly, while the log-scales stalled: from ``init_std=0.01`` the fit diverged
(``benchmarks/flow_start.py``). With the delay, the group first fits a mean-field Gaussian, whose
scale the flow then leaves to ``log_scale`` and only shapes. The marginal
mean and std are Monte Carlo estimates over :data:`SUMMARY_SAMPLES` draws from a fixed seed
(repeatable; their error is about std / 45).

Limits: at most :data:`MAX_DIM` weights per group, all on one device with one dtype, and every
parameter of the group needs a gradient at every step. Cost grows with D times the hidden width:
each transform's last layer has ``D * (3 * bins - 1) * hidden`` weights.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor, nn

from ..kernels.gaussian import LOG_SCALE_MAX, LOG_SCALE_MIN
from . import _proximal
from .base import START_OPTIONS, Family, register, start_std, state_dtype

__all__ = ["DenseFlow", "MAX_DIM", "DEFAULT_OPTIONS"]

MAX_DIM = 20_000
SUMMARY_SAMPLES = 2048
DEFAULT_OPTIONS: dict[str, Any] = {"transforms": 2, "hidden_features": (32, 32), "bins": 8, "lr_ratio": 0.1,
                                   "delay": 500}
_LOG_2PI = math.log(2 * math.pi)


def _zuko():
    try:
        import zuko
    except ImportError:
        raise ImportError("family='flow' needs the zuko package: pip install zuko (or "
                          "pip install 'torch_proxvi[flows]'), or use family='elementwise_flow'") from None
    return zuko


def _build(zuko, dim: int, transforms: int, hidden_features: tuple[int, ...], bins: int) -> nn.Module:
    """``transforms`` pairs of (affine coupling, rational-quadratic spline coupling), halves
    alternating: the affine layers carry scale and linear correlation without bound, the splines
    (on [-5, 5], identity outside) the shape."""
    from functools import partial

    from ._flow_layers import Affine, Spline  # zuko's layers, their score's derivative cheaper

    orders = [torch.arange(dim), torch.flipud(torch.arange(dim))]
    layers = []
    for i in range(transforms):
        common = dict(features=dim, context=0, passes=2, order=orders[i % 2], hidden_features=hidden_features)
        layers.append(zuko.flows.MaskedAutoregressiveTransform(**common, univariate=Affine))
        layers.append(zuko.flows.MaskedAutoregressiveTransform(
            **common, univariate=partial(Spline, slope=1e-3),
            shapes=[(bins,), (bins,), (bins - 1,)]))
    base = zuko.flows.UnconditionalDistribution(
        zuko.distributions.DiagNormal, loc=torch.zeros(dim), scale=torch.ones(dim), buffer=True)
    return zuko.flows.Flow(layers, base)


class _Transform(nn.Module):
    """Wraps a zuko flow so that ``torch.func.functional_call`` can run it on state tensors."""

    def __init__(self, flow: nn.Module):
        super().__init__()
        self.flow = flow

    def forward(self, y: Tensor, inverse: bool = False):
        transform = self.flow.transform()
        if inverse:
            return transform.inv(y)
        return transform.call_and_ladj(y)


def _run(module: _Transform, weights: dict[str, Tensor], *args):
    """``module(*args)`` with ``weights`` in place of its parameters. zuko's flows tie no weights,
    so functional_call's search for tied ones, a cost of every call, is skipped."""
    return torch.func.functional_call(module, weights, args, tie_weights=False)


_TEMPLATES: dict[tuple, tuple[_Transform, list[str], list[torch.Size]]] = {}


def _options(group: dict) -> dict[str, Any]:
    options = dict(DEFAULT_OPTIONS)
    options.update(group.get("flow_options") or {})
    if isinstance(options["hidden_features"], list):
        options["hidden_features"] = tuple(options["hidden_features"])
    return options


def _template(group: dict, dim: int, dtype: torch.dtype, device) -> tuple[_Transform, list[str], list[torch.Size]]:
    """The zuko module of this group's layout (its own weights are never used: state is)."""
    options = _options(group)
    options.pop("lr_ratio")
    options.pop("delay")
    key = (dim, tuple(sorted(options.items())), dtype, str(device))
    if key not in _TEMPLATES:
        zuko = _zuko()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            flow = _build(zuko, dim, **options)
        for transform in flow.transform.transforms:  # identity at the start: zero spline knots
            head = transform.hyper[-1] if hasattr(transform, "hyper") else transform  # D = 1
            for weight in head.parameters():
                nn.init.zeros_(weight)
        module = _Transform(flow).to(dtype=dtype, device=device).requires_grad_(False)
        names, shapes = zip(*[(n, p.shape) for n, p in module.named_parameters()])
        _TEMPLATES[key] = (module, list(names), list(shapes))
    return _TEMPLATES[key]


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


#: each flow option's rule: (check, what it must be)
_OPTION_RULES: dict[str, tuple[Any, str]] = {
    "transforms": (lambda v: _is_int(v) and v >= 1, "an int >= 1: the pairs of coupling layers"),
    "hidden_features": (lambda v: isinstance(v, (tuple, list)) and len(v) >= 1
                        and all(_is_int(h) and h >= 1 for h in v),
                        "a non-empty tuple of ints >= 1: the hyper-networks' widths"),
    "bins": (lambda v: _is_int(v) and v >= 1, "an int >= 1: the spline's knots"),
    "lr_ratio": (lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 <= v < math.inf,
                 "a finite float >= 0: the network's lr relative to lr"),
    "delay": (lambda v: _is_int(v) and v >= 0, "an int >= 0: the steps before the flow's network starts to learn"),
}


def _validate_options(options: dict[str, Any]) -> None:
    for key, (ok, rule) in _OPTION_RULES.items():
        if not ok(options[key]):
            raise ValueError(f"Invalid flow_options[{key!r}]: {options[key]!r} (must be {rule})")


def _dim(group: dict) -> int:
    return sum(p.numel() for p in group["params"])


class DenseFlow(Family):
    """``family="flow"``: a coupling spline flow over a whole small group (module docstring)."""

    name = "flow"
    joint = True
    variational = ("loc", "log_scale")
    mean_updates = ("residual",)
    scale_lr_ratio = 10.0
    options = dict(START_OPTIONS)
    _mean_update_note = ("the flow's location follows the full score-matching residual; leave "
                         "mean_update=None")

    def validate(self, group):
        super().validate(group)
        dim = _dim(group)
        if dim > MAX_DIM:
            raise ValueError(
                f"family='flow' is limited to {MAX_DIM} weights per parameter group, got {dim}: "
                f"give only a small layer (e.g. the classifier head) its own group with "
                f"family='flow', and use family='elementwise_flow' or 'gaussian' for the rest")
        if len({(p.device, p.dtype) for p in group["params"]}) > 1:
            raise ValueError("family='flow' needs all parameters of a group on one device with "
                             "one dtype: split the group")
        options = group.get("flow_options")
        if options is not None and (not isinstance(options, dict) or set(options) - set(DEFAULT_OPTIONS)):
            raise ValueError(f"Invalid flow_options: {options!r} (a dict with keys among "
                             f"{sorted(DEFAULT_OPTIONS)}, e.g. {{'transforms': 3, 'hidden_features': (64, 64)}})")
        _validate_options(_options(group))
        p = group["params"][0]
        _template(group, dim, state_dtype(p), p.device)  # zuko present, options accepted

    # ---------------------------------------------------------------- storage
    def init_state(self, state, p, group):
        loc = p.detach().to(state_dtype(p), copy=True)
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["loc"] = loc
        state["log_scale"] = torch.full_like(loc, math.log(start_std(group, p)))
        names = ["loc", "log_scale"]
        if p is group["params"][0]:
            module, _, _ = _template(group, _dim(group), loc.dtype, loc.device)
            state["flow"] = torch.cat([w.detach().reshape(-1) for w in module.parameters()]).clone()
            names.append("flow")
        for name in names:
            state[f"{name}_exp_avg_sq"] = torch.zeros_like(state[name])
            if group["betas"][0] > 0:
                state[f"{name}_exp_avg"] = torch.zeros_like(state[name])

    def state_shape(self, p, key, group):
        if key.startswith("flow"):
            module, _, _ = _template(group, _dim(group), state_dtype(p), p.device)
            return (sum(w.numel() for w in module.parameters()),)
        return tuple(p.shape)

    # ---------------------------------------------------------------- the density
    def _parts(self, group: dict, states: list[dict], phi: list[Tensor] | None = None):
        """(flat loc, flat log_scale, module, weights dict) from the states or from ``phi``
        = [loc per parameter..., log_scale per parameter..., flow]."""
        n = len(states)
        if phi is None:
            phi = [st["loc"] for st in states] + [st["log_scale"] for st in states] + [states[0]["flow"]]
        loc = torch.cat([t.reshape(-1) for t in phi[:n]])
        log_scale = torch.cat([t.reshape(-1) for t in phi[n:2 * n]])
        module, names, shapes = _template(group, loc.numel(), loc.dtype, loc.device)
        weights, start = {}, 0
        for name, shape in zip(names, shapes):
            size = math.prod(shape)
            weights[name] = phi[-1][start:start + size].view(shape)
            start += size
        return loc, log_scale, module, weights

    @staticmethod
    def _log_prob(parts, theta: Tensor) -> Tensor:
        """log q of flat samples ``theta`` [..., D] (differentiable in theta and parts)."""
        loc, log_scale, module, weights = parts
        y = (theta - loc) * torch.exp(-log_scale)
        z, ladj = _run(module, weights, y)
        return -0.5 * (z * z).sum(-1) - 0.5 * loc.numel() * _LOG_2PI + ladj - log_scale.sum()

    @staticmethod
    def _draw(parts, noise: Tensor) -> Tensor:
        loc, log_scale, module, weights = parts
        return loc + log_scale.exp() * _run(module, weights, noise, True)

    @staticmethod
    def _split(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
        """Flat [..., D] back to tensors shaped like ``like`` (leading dimensions kept)."""
        out, start = [], 0
        for t in like:
            out.append(flat[..., start:start + t.numel()].reshape(flat.shape[:-1] + t.shape))
            start += t.numel()
        return out

    def _noise(self, states, generator, count: int | None = None) -> Tensor:
        dim = sum(st["loc"].numel() for st in states)
        loc = states[0]["loc"]
        shape = (dim,) if count is None else (count, dim)
        return torch.randn(shape, generator=generator, device=loc.device, dtype=loc.dtype)

    def sample(self, group, params, states, generator, count=None, *, path="single"):
        flat = self._draw(self._parts(group, states), self._noise(states, generator, count))
        return self._split(flat, [st["loc"] for st in states])

    @staticmethod
    def _flat(thetas: list[Tensor], states: list[dict] | None = None) -> Tensor:
        """Concatenate along the weights; with ``states``, leading batch dimensions are kept."""
        if states is None:
            return torch.cat([t.reshape(-1) for t in thetas])
        batch = thetas[0].shape[:thetas[0].dim() - states[0]["loc"].dim()]
        return torch.cat([t.reshape(*batch, st["loc"].numel()) for t, st in zip(thetas, states)], -1)

    def log_prob(self, group, states, thetas):
        return self._log_prob(self._parts(group, states), self._flat(thetas, states))

    def score(self, group, states, thetas):
        theta = self._flat(thetas, states).detach().requires_grad_()
        with torch.enable_grad():
            log_q = self._log_prob(self._parts(group, states), theta).sum()
            (grad,) = torch.autograd.grad(log_q, theta)
        return self._split(grad, [st["loc"] for st in states])

    def kl(self, group, states, others, generator=None):
        """Monte Carlo over 256 reparameterised draws from ``states``."""
        parts = self._parts(group, states)
        theta = self._draw(parts, self._noise(states, generator, 256))
        return (self._log_prob(parts, theta) - self._log_prob(self._parts(group, others), theta)).mean()

    def _moments(self, group, states):
        generator = torch.Generator(device=states[0]["loc"].device).manual_seed(0)
        parts = self._parts(group, states)
        draws = torch.cat([self._draw(parts, self._noise(states, generator, 256))
                           for _ in range(SUMMARY_SAMPLES // 256)])
        return draws.mean(0), draws.std(0)

    def mean(self, group, params, states):
        return self._split(self._moments(group, states)[0], [st["loc"] for st in states])

    def std(self, group, params, states):
        return self._split(self._moments(group, states)[1], [st["loc"] for st in states])

    # ---------------------------------------------------------------- the step
    def collect(self, group, state, theta, score, acc, weight):
        return _proximal.ScoreSamples.collect(acc, theta, score)

    def update(self, group, states, accs, *, generator, path="single"):
        outer_steps = float(states[0]["step"]) // group["inner_steps"]
        frozen = outer_steps < group["warmup_steps"]
        beta1 = group["betas"][0]
        scale_lr = group["lr"] * group["scale_lr_ratio"]
        bounds = (LOG_SCALE_MIN, LOG_SCALE_MAX)
        locs, log_scales = [], []
        for st in states:
            loc, log_scale = _proximal.adam_variables(
                st, {"loc": (group["lr"], None), "log_scale": (scale_lr, bounds)}, beta1, "loc", frozen)
            locs.append(loc)
            log_scales.append(log_scale)
        options = _options(group)
        (flow,) = _proximal.adam_variables(states[0], {"flow": (group["lr"] * options["lr_ratio"], None)}, beta1,
                                           "loc", frozen or outer_steps < options["delay"])
        k = len(accs[0].theta)
        thetas = torch.stack([self._flat([acc.theta[i] for acc in accs]) for i in range(k)])
        scores = [self._flat([acc.score[i] for acc in accs]) for i in range(k)]
        weight = torch.exp(2 * self._flat([st["log_scale"] for st in states]))

        def model_score(phi):
            theta = thetas.detach().requires_grad_()
            log_q = self._log_prob(self._parts(group, states, phi), theta).sum()
            (grad,) = torch.autograd.grad(log_q, theta, create_graph=True)
            return list(grad)

        def kl(phi, phi_t):
            parts = self._parts(group, states, phi)
            theta = self._draw(parts, self._noise(states, generator, 16))
            return (self._log_prob(parts, theta) - self._log_prob(self._parts(group, states, phi_t), theta)).mean()

        _proximal.proximal_step(
            locs + log_scales + [flow], [st["step"] for st in states], model_score, scores,
            [], weight, kl=kl, inner_steps=group["inner_steps"], prox_weight=group["prox_weight"],
            betas=group["betas"], eps=group["eps"], mean_update="residual")


DENSE_FLOW = register(DenseFlow())
