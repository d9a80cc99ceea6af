"""Hamiltonian Monte Carlo reference sampler with vectorised chains and Stan-style adaptive warm-up.

Benchmarks use it for long-run reference posteriors to compare variational approximations against. ``C`` independent
chains advance in lockstep: one batched leapfrog integrator, one shared step size, one Metropolis test per chain.

One iteration, for all chains at once::

    p ~ N(0, M),  M = diag(1 / inverse_mass),  H(x, p) = -log_prob(x) + p' M^-1 p / 2
    eps_t = step_size * U(0.8, 1.2)                 # jitter, against periodic trajectories
    (x', p') = num_leapfrog leapfrog steps of size eps_t from (x, p)
    accept x' with probability min(1, exp(H(x, p) - H(x', p')))   # non-finite H(x', p'): divergence, rejected

Warm-up: the step size follows dual averaging (Hoffman & Gelman 2014; Stan's gamma=0.05, t0=10, kappa=0.75) of
the chain-averaged acceptance probability towards ``target_accept``. From 15% to 85% of warm-up, windows of doubling
length (the last one stretched) pool the chains' draws; at the end of each, ``inverse_mass`` becomes their
per-coordinate variance (shrunk towards 1e-3 as in Stan) and the step size is re-initialised (doubling/halving
heuristic) and re-adapted. Sampling then uses the dual-averaged step size, fixed.

Example::

    >>> import torch
    >>> from torch_proxvi.reference.hmc import hmc, split_rhat
    >>> scale = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    >>> log_prob = lambda x: -0.5 * ((x / scale) ** 2).sum(-1)
    >>> g = torch.Generator().manual_seed(0)
    >>> res = hmc(log_prob, torch.zeros(4, 3), num_samples=500, warmup=300, generator=g)
    >>> res.samples.shape
    torch.Size([4, 500, 3])
    >>> bool((split_rhat(res.samples) < 1.05).all())
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["HMCResult", "hmc", "split_rhat", "effective_sample_size"]

_GAMMA, _T0, _KAPPA = 0.05, 10.0, 0.75  # Stan's dual-averaging constants
_INIT_BUFFER, _TERM_BUFFER, _BASE_WINDOW = 0.15, 0.15, 0.05  # fractions of warm-up
_MIN_ADAPT_WARMUP = 20  # shorter warm-ups adapt the step size only
_JITTER = 0.2  # step size drawn uniformly in [1 - _JITTER, 1 + _JITTER] * step_size
_DIVERGENCE_ENERGY = 1000.0  # an energy error above this also counts as a divergence (as in Stan)


class HMCResult(NamedTuple):
    samples: Tensor  # [C, S, D] float64, post warm-up, thinned
    accept_rate: float  # mean acceptance probability over post-warm-up iterations and chains
    step_size: float  # the (un-jittered) step size used after warm-up
    inverse_mass: Tensor  # [D] diagonal inverse mass matrix (the adapted posterior variances)
    divergences: int  # post-warm-up transitions (summed over chains) with non-finite or exploding energy


class _DualAveraging:
    def __init__(self, step_size: float, target: float):
        self.mu, self.target = math.log(10.0 * step_size), target
        self.t, self.h_bar, self.log_eps_bar = 0, 0.0, 0.0

    def update(self, accept_prob: float) -> float:
        self.t += 1
        eta = 1.0 / (self.t + _T0)
        self.h_bar = (1.0 - eta) * self.h_bar + eta * (self.target - accept_prob)
        log_eps = self.mu - math.sqrt(self.t) / _GAMMA * self.h_bar
        w = self.t**-_KAPPA
        self.log_eps_bar = w * log_eps + (1.0 - w) * self.log_eps_bar
        return math.exp(log_eps)

    @property
    def final(self) -> float:
        return math.exp(self.log_eps_bar)


def _log_prob_and_grad(log_prob: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        lp = log_prob(x)
        if lp.shape != x.shape[:1]:
            raise ValueError(f"log_prob must map [C, D] to [C]; got {tuple(lp.shape)} for input {tuple(x.shape)}")
        (grad,) = torch.autograd.grad(lp.sum(), x)
    return lp.detach().to(torch.float64), grad.detach()


def _trajectory(log_prob, x, lp, grad, inv_mass, eps, num_steps, gen):
    """Leapfrog all chains from fresh momenta; returns the proposal and the log acceptance ratio (-inf if divergent)."""
    p = torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device) / inv_mass.sqrt()
    h0 = 0.5 * (inv_mass * p * p).sum(-1) - lp
    p = p + 0.5 * eps * grad
    for i in range(num_steps):
        x = x + eps * inv_mass * p
        lp, grad = _log_prob_and_grad(log_prob, x)
        p = p + (eps if i < num_steps - 1 else 0.5 * eps) * grad
    h1 = 0.5 * (inv_mass * p * p).sum(-1) - lp
    divergent = ~torch.isfinite(h1) | (h1 - h0 > _DIVERGENCE_ENERGY)
    log_ratio = torch.where(divergent, torch.full_like(h1, -math.inf), h0 - h1)
    return x, lp, grad, log_ratio, divergent


def _initial_step_size(log_prob, x, lp, grad, inv_mass, eps, gen) -> float:
    """Stan's heuristic: double or halve ``eps`` until one leapfrog step's mean acceptance crosses 0.5."""

    def mean_accept(e: float) -> float:
        log_ratio = _trajectory(log_prob, x, lp, grad, inv_mass, e, 1, gen)[3]
        return log_ratio.exp().clamp(max=1.0).mean().item()

    up = mean_accept(eps) > 0.5
    for _ in range(50):
        eps = eps * 2.0 if up else eps / 2.0
        if (mean_accept(eps) > 0.5) != up:
            break
    return eps


def _window_ends(warmup: int) -> list[int]:
    """End iterations (exclusive) of the mass-matrix windows: doubling lengths, the last stretched to the end."""
    if warmup < _MIN_ADAPT_WARMUP:
        return []
    start, end = int(_INIT_BUFFER * warmup), warmup - int(_TERM_BUFFER * warmup)
    size, ends = max(int(_BASE_WINDOW * warmup), 1), []
    while start < end:
        stop = end if start + 3 * size > end else start + size
        ends.append(stop)
        start, size = stop, 2 * size
    return ends


def hmc(
    log_prob: Callable[[Tensor], Tensor],
    init: Tensor,
    *,
    num_samples: int,
    warmup: int,
    num_leapfrog: int = 20,
    step_size: float = 0.1,
    target_accept: float = 0.8,
    thin: int = 1,
    generator: torch.Generator | None = None,
) -> HMCResult:
    """Run ``C = init.shape[0]`` HMC chains in lockstep on the unnormalised density ``log_prob``.

    ``log_prob`` maps float64 ``[C, D]`` to ``[C]`` and must treat rows independently (gradients are taken of
    ``log_prob(x).sum()``). Each chain keeps ``num_samples`` draws, one every ``thin`` iterations after ``warmup``
    adaptation iterations (see the module docstring); ``step_size`` is the starting point of the adaptation, or the
    step size itself when ``warmup == 0``. All randomness comes from ``generator`` (torch's global RNG if None).
    """
    if init.dim() != 2 or init.shape[0] < 1 or init.shape[1] < 1:
        raise ValueError(f"init must have shape [C, D] with C, D >= 1; got {tuple(init.shape)}")
    if num_samples < 1 or warmup < 0 or num_leapfrog < 1 or thin < 1:
        raise ValueError("need num_samples >= 1, warmup >= 0, num_leapfrog >= 1 and thin >= 1")
    if not (step_size > 0 and math.isfinite(step_size)) or not 0.0 < target_accept < 1.0:
        raise ValueError("need a finite step_size > 0 and 0 < target_accept < 1")
    x = init.detach().to(torch.float64).clone()
    lp, grad = _log_prob_and_grad(log_prob, x)
    if not torch.isfinite(lp).all():
        raise ValueError("log_prob(init) must be finite for every chain")
    kw = dict(dtype=torch.float64, device=x.device)
    inv_mass = torch.ones(x.shape[1], **kw)
    ends = _window_ends(warmup)
    first = int(_INIT_BUFFER * warmup)
    eps = _initial_step_size(log_prob, x, lp, grad, inv_mass, step_size, generator) if warmup else step_size
    adapt = _DualAveraging(eps, target_accept)
    window: list[Tensor] = []
    samples: list[Tensor] = []
    accept_sum, divergences = 0.0, 0
    for it in range(warmup + num_samples * thin):
        jitter = 1.0 + _JITTER * (2.0 * torch.rand((), generator=generator, **kw).item() - 1.0)
        x1, lp1, grad1, log_ratio, divergent = _trajectory(
            log_prob, x, lp, grad, inv_mass, eps * jitter, num_leapfrog, generator
        )
        accept_prob = log_ratio.exp().clamp(max=1.0)
        accept = torch.rand(x.shape[0], generator=generator, **kw) < accept_prob
        x = torch.where(accept[:, None], x1, x)
        lp = torch.where(accept, lp1, lp)
        grad = torch.where(accept[:, None], grad1, grad)
        if it >= warmup:
            accept_sum += accept_prob.mean().item()
            divergences += int(divergent.sum().item())
            if (it - warmup + 1) % thin == 0:
                samples.append(x)
            continue
        eps = adapt.update(accept_prob.mean().item())
        if ends and first <= it < ends[-1]:
            window.append(x)
        if it + 1 in ends:  # end of a mass-matrix window: new metric, restart the step-size adaptation
            pooled = torch.cat(window)
            n = pooled.shape[0]
            inv_mass = n / (n + 5.0) * pooled.var(0, correction=1) + 1e-3 * 5.0 / (n + 5.0)
            window = []
            eps = _initial_step_size(log_prob, x, lp, grad, inv_mass, eps, generator)
            adapt = _DualAveraging(eps, target_accept)
        if it + 1 == warmup:
            eps = adapt.final
    return HMCResult(
        samples=torch.stack(samples, 1),
        accept_rate=accept_sum / (num_samples * thin),
        step_size=eps,
        inverse_mass=inv_mass,
        divergences=divergences,
    )


def _split_chains(samples: Tensor) -> Tensor:
    """``[C, S, D]`` -> ``[2C, S // 2, D]`` float64: first and second halves (the middle draw dropped if S is odd)."""
    if samples.dim() != 3 or samples.shape[1] < 4:
        raise ValueError(f"samples must have shape [C, S, D] with S >= 4; got {tuple(samples.shape)}")
    half = samples.shape[1] // 2
    return torch.cat([samples[:, :half], samples[:, samples.shape[1] - half :]]).to(torch.float64)


def _within_and_pooled_var(chains: Tensor) -> tuple[Tensor, Tensor]:
    n = chains.shape[1]
    within = chains.var(1, correction=1).mean(0)
    return within, (n - 1) / n * within + chains.mean(1).var(0, correction=1)


def split_rhat(samples: Tensor) -> Tensor:
    """Split-R-hat (Gelman et al., BDA3 section 11.4) per coordinate of ``[C, S, D]`` samples; returns ``[D]``."""
    within, pooled = _within_and_pooled_var(_split_chains(samples))
    return (pooled / within).sqrt()


def effective_sample_size(samples: Tensor) -> Tensor:
    """Effective sample size per coordinate of ``[C, S, D]`` samples; returns ``[D]``.

    Split chains; autocorrelations combine the chains' autocovariances with the between-chain variance (BDA3
    section 11.5); the sum is truncated by Geyer's initial monotone sequence over lag pairs; like Stan the
    integrated autocorrelation time is floored at ``1 / log10(total draws)``.
    """
    chains = _split_chains(samples)
    m, n, _ = chains.shape
    centred = chains - chains.mean(1, keepdim=True)
    spec = torch.fft.rfft(centred, n=2 * n, dim=1)
    acov = torch.fft.irfft(spec.real**2 + spec.imag**2, n=2 * n, dim=1)[:, :n] / n  # [m, n, D], biased
    within, pooled = _within_and_pooled_var(chains)
    rho = 1.0 - (within - acov.mean(0)) / pooled
    rho[0] = 1.0
    pairs = rho[: 2 * (n // 2)].reshape(n // 2, 2, -1).sum(1)  # [n // 2, D]: rho_2k + rho_2k+1
    positive = torch.cumprod((pairs > 0).to(pairs.dtype), 0)
    pairs = torch.cummin(pairs, 0).values
    tau = (-1.0 + 2.0 * (pairs * positive).sum(0)).clamp(min=1.0 / math.log10(m * n))
    return m * n / tau
