"""Reading the posterior: mean and std per parameter, the weight-swapping contexts, train/eval
(how they compose, and where a step or a checkpoint would lose the training sample) and the
predictive. A mixin of :class:`~torch_proxvi.ProxScoreOptimizer` (and its baselines)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from . import predictive as _predictive
from .families import start_std, state_dtype

__all__ = ["PosteriorAccess"]


class PosteriorAccess:
    """Uses the optimizer's ``state``, ``_params``, ``_group_of``, ``_family``, ``_draw``,
    ``_seed``, and ``_mode`` / ``_held`` (set in ``__init__``: train mode, nothing held).

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
            return torch.full(p.shape, start_std(group, p), dtype=state_dtype(p), device=p.device)
        return self._summaries([(group, p)], "std")[p]

    # ------------------------------------------------------------------ what the weights hold
    # The weights hold the training sample, or a value swapped in over it: the posterior mean in
    # eval mode, or the values of the open contexts (mean_params, sampled_params), which nest.
    # While anything is swapped in, ``_held`` keeps the training sample (and only then). Outside
    # any context the mode decides what the weights show; inside, the innermost context does,
    # and eval()/train() there only set the mode that applies when the last context ends.
    _open = 0                 # open contexts (a class default: __init__ belongs to the optimizer)
    _warned_mc_samples = False

    def _swapping_in(self) -> bool:
        return self._mode != "train" or self._open > 0

    def _set_aside_sample(self, pairs) -> None:
        """Keep the training sample in ``_held`` if the weights hold it (before a swap)."""
        if not self._swapping_in():
            self._held = {p: p.detach().clone() for _, p in pairs}

    @torch.no_grad()
    def _show(self, values) -> None:
        for p, value in values.items():
            p.copy_(value)

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

        Yields a function that redraws the sample. Draws from ``generator``, by default from the
        optimizer's evaluation generator (seeded from the optimizer's seed); never from the
        training RNG nor torch's global RNG, so evaluating changes neither training nor the
        shuffling and dropout of the rest of the program.
        """
        def generator_of(device: torch.device) -> torch.Generator:
            return generator if generator is not None else self._evaluation_generator(device)

        with self._swapped(lambda pairs: self._draw(pairs, generator_of)) as redraw:
            yield redraw

    def _evaluation_generator(self, device: torch.device) -> torch.Generator:
        """The default generator of ``sampled_params`` and ``predictive`` on ``device``: its own
        stream, seeded from the optimizer's seed (shared by all ranks under torch.distributed)."""
        generators = self.__dict__.setdefault("_evaluation_generators", {})
        key = str(device)
        if key not in generators:
            seed = (self._seed + 0x9E3779B97F4A7C15) % 2**63  # another stream than training's
            generators[key] = torch.Generator(device=device).manual_seed(seed)
        return generators[key]

    @contextlib.contextmanager
    def _swapped(self, values: Callable[[list], dict[Tensor, Tensor]]) -> Iterator[Callable[[], None]]:
        pairs = list(self._params(with_state=True))
        mode = self._mode
        self._set_aside_sample(pairs)
        # what the weights hold now: the training sample (already in _held), or a swapped value
        entry = self._held if not self._swapping_in() else {p: p.detach().clone() for _, p in pairs}

        def write() -> None:
            self._show(values(pairs))

        self._open += 1
        try:
            write()
            yield write
        finally:
            self._open -= 1
            if self._open or self._mode == mode:
                self._show(entry)                                  # exactly what was there
            elif self._mode == "eval":
                self._show(self._summaries(pairs, "mean"))         # eval() was called inside
            else:
                self._show(self._held)                             # train() was called inside
            if not self._swapping_in():
                self._held = {}

    def eval(self) -> None:
        """Put the posterior mean into the weights (keeps the training sample for ``train()``).
        Inside ``mean_params()`` / ``sampled_params()`` it only sets the mode, which applies when
        the block ends."""
        if self._mode == "eval":
            return
        pairs = list(self._params(with_state=True))
        self._set_aside_sample(pairs)
        self._mode = "eval"
        if not self._open:
            self._show(self._summaries(pairs, "mean"))

    def train(self) -> None:
        """Put back the training sample that ``eval()`` set aside. Inside ``mean_params()`` /
        ``sampled_params()`` it only sets the mode, which applies when the block ends."""
        if self._mode == "train":
            return
        self._mode = "train"
        if not self._open:
            self._show(self._held)
            self._held = {}

    def _check_step(self, closure) -> None:
        """Called first by ``step()``: refuse a step, before anything changes, where the weights
        do not hold the training sample; warn once when ``mc_samples > 1`` has no closure."""
        name = type(self).__name__
        if self._open:
            raise RuntimeError(
                f"{name}.step() called inside mean_params() or sampled_params(): the weights hold "
                f"swapped-in values, and the fresh sample the step writes would be overwritten when "
                f"the block ends; call step() after the `with` block")
        if self._mode != "train":
            raise RuntimeError(f"{name}.step() called in eval mode: the weights hold the posterior "
                               f"mean; call optimizer.train() first")
        if closure is None and not self._warned_mc_samples:
            k = max(g["mc_samples"] for g in self.param_groups)
            if k > 1:
                self._warned_mc_samples = True
                warnings.warn(
                    f"{name}: mc_samples={k} but step() got no closure, so the step used the one "
                    f"sample in the weights (K = 1); pass step() a closure (zero grads, forward, "
                    f"backward, return the loss) to draw K samples, or set mc_samples=1",
                    UserWarning, stacklevel=5)  # past step() and torch's no_grad and hook wrappers

    def state_dict(self) -> dict[str, Any]:
        """In eval mode it also holds each parameter's training sample (``"held_sample"``) and the
        mode, so a checkpoint saved there resumes exactly: ``load_state_dict`` restores eval mode and
        the held sample, and ``train()`` writes it back (:mod:`torch_proxvi._checkpoint`). Inside
        ``mean_params()`` / ``sampled_params()`` it warns: the weights hold the block's values, so
        ``model.state_dict()`` taken there (in train mode) would resume from other weights."""
        if self._open:
            warnings.warn(
                f"{type(self).__name__}.state_dict() called inside mean_params() or sampled_params(): "
                f"the weights hold the block's values (the posterior mean or another sample), not "
                f"what they hold after the block, so a checkpoint with model.state_dict() taken now "
                f"would resume from other weights; save after the `with` block",
                UserWarning, stacklevel=2)
        return super().state_dict()

    def predictive(self, model: torch.nn.Module, inputs, n_samples: int = 32,
                   likelihood: str = "classification",
                   generator: torch.Generator | None = None):
        """Bayesian model average over ``n_samples`` posterior samples; see
        :func:`torch_proxvi.predictive.predictive`."""
        return _predictive.predictive(self, model, inputs, n_samples=n_samples,
                                      likelihood=likelihood, generator=generator)
