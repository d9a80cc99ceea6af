"""Reading the posterior: mean and std per parameter, the weight-swapping contexts, train/eval
and the predictive. A mixin of :class:`~torch_proxvi.ProxScoreOptimizer` (and its baselines)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from . import predictive as _predictive
from .families import gaussian

__all__ = ["PosteriorAccess"]


class PosteriorAccess:
    """Uses the optimizer's ``state``, ``_params``, ``_group_of``, ``_init_state``, ``_draw``."""

    def _state_or_initial(self, p: Tensor) -> dict[str, Tensor]:
        """The state of ``p``, or what it will be at its first step (without storing it)."""
        group = self._group_of(p)
        if self._has_posterior(p):
            return self.state[p]
        initial: dict[str, Tensor] = {}
        self._init_state(initial, p, group)
        return initial

    def posterior_mean(self, p: Tensor) -> Tensor:
        """The variational mean of parameter ``p`` (float32 or float64, shape of ``p``)."""
        return gaussian.mean(self._state_or_initial(p)).clone()

    def posterior_std(self, p: Tensor) -> Tensor:
        """The marginal posterior standard deviation of parameter ``p`` (shape of ``p``)."""
        return self._std(p, self._state_or_initial(p))

    def _std(self, p: Tensor, state: dict) -> Tensor:
        return gaussian.std(state)

    @contextlib.contextmanager
    def mean_params(self) -> Iterator[None]:
        """Within the block the weights hold the posterior mean; restored afterwards."""
        with self._swapped(lambda pairs: {p: gaussian.mean(self.state[p]) for _, p in pairs}):
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
            for _, p in self._params(with_state=True):
                self._held[p] = p.detach().clone()
                p.copy_(gaussian.mean(self.state[p]))
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
