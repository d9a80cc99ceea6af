"""Reading the posterior: mean and std per parameter, the weight-swapping contexts, train/eval
and the predictive. A mixin of :class:`~torch_proxvi.ProxScoreOptimizer` (and its baselines)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from . import predictive as _predictive
from .families import state_dtype

__all__ = ["PosteriorAccess"]


class PosteriorAccess:
    """Uses the optimizer's ``state``, ``_params``, ``_group_of``, ``_family``, ``_draw``.

    Before its first step a parameter's posterior is the family's starting point, which for
    every family is mean = the weights, marginal std = ``init_std``.
    """

    def _summaries(self, pairs, which: str) -> dict[Tensor, Tensor]:
        """The family's marginal ``"mean"`` or ``"std"`` of each ``(group, p)`` of ``pairs``
        (which have state); a joint family answers for its whole group at once."""
        out: dict[Tensor, Tensor] = {}
        for group, p in pairs:
            if p in out:
                continue
            family = self._family(group)
            params = ([q for q in group["params"] if self._has_posterior(q)] if family.joint else [p])
            out.update(zip(params, getattr(family, which)(group, params, [self.state[q] for q in params])))
        return out

    def posterior_mean(self, p: Tensor) -> Tensor:
        """The marginal posterior mean of parameter ``p`` (float32 or float64, shape of ``p``):
        the family's mean (for the flows see their docs: quadrature or Monte Carlo)."""
        group = self._group_of(p)
        if not self._has_posterior(p):
            return p.detach().to(state_dtype(p), copy=True)
        return self._summaries([(group, p)], "mean")[p].clone()

    def posterior_std(self, p: Tensor) -> Tensor:
        """The marginal posterior standard deviation of parameter ``p`` (shape of ``p``)."""
        group = self._group_of(p)
        if not self._has_posterior(p):
            return torch.full(p.shape, float(group["init_std"]), dtype=state_dtype(p), device=p.device)
        return self._summaries([(group, p)], "std")[p]

    @contextlib.contextmanager
    def mean_params(self) -> Iterator[None]:
        """Within the block the weights hold the posterior mean; restored afterwards."""
        with self._swapped(lambda pairs: self._summaries(pairs, "mean")):
            yield

    @contextlib.contextmanager
    def sampled_params(
        self, generator: torch.Generator | None = None
    ) -> Iterator[Callable[[], None]]:
        """Within the block the weights hold a fresh posterior sample; restored afterwards.

        Yields a function that redraws the sample. Draws from ``generator`` (default: torch's
        global RNG), never from the training RNG, so evaluation does not change training.
        """
        with self._swapped(lambda pairs: self._draw(pairs, lambda device: generator)) as redraw:
            yield redraw

    @contextlib.contextmanager
    def _swapped(self, values: Callable[[list], dict[Tensor, Tensor]]) -> Iterator[Callable[[], None]]:
        pairs = list(self._params(with_state=True))
        saved = [(p, p.detach().clone()) for _, p in pairs]

        @torch.no_grad()
        def write() -> None:
            for p, value in values(pairs).items():
                p.copy_(value)

        try:
            write()
            yield write
        finally:
            with torch.no_grad():
                for p, old in saved:
                    p.copy_(old)

    def eval(self) -> None:
        """Put the posterior mean into the weights (keeps the training sample for ``train()``)."""
        if self._mode == "eval":
            return
        with torch.no_grad():
            pairs = list(self._params(with_state=True))
            for p, mean in self._summaries(pairs, "mean").items():
                self._held[p] = p.detach().clone()
                p.copy_(mean)
        self._mode = "eval"

    def train(self) -> None:
        """Put back the training sample that ``eval()`` set aside."""
        if self._mode == "train":
            return
        with torch.no_grad():
            for p, sample in self._held.items():
                p.copy_(sample)
        self._held.clear()
        self._mode = "train"

    def predictive(self, model: torch.nn.Module, inputs, n_samples: int = 32,
                   likelihood: str = "classification",
                   generator: torch.Generator | None = None):
        """Bayesian model average over ``n_samples`` posterior samples; see
        :func:`torch_proxvi.predictive.predictive`."""
        return _predictive.predictive(self, model, inputs, n_samples=n_samples,
                                      likelihood=likelihood, generator=generator)
