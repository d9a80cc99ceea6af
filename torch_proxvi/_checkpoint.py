"""Exact checkpoints: ``state_dict`` with the sampling RNG, a ``load_state_dict`` that checks
everything before it changes anything (:mod:`torch_proxvi._load_validation`), and pickling. A
mixin of :class:`~torch_proxvi.ProxScoreOptimizer`."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from ._load_validation import EXTRAS, HELD, prepare

__all__ = ["Checkpointing"]


class Checkpointing:
    """Adds the optimizer's own entries to torch's state_dict and checks a state_dict on loading.

    ``state_dict()`` is torch's, completed before torch's state_dict post-hooks run:

    * every parameter that requires grad and has not stepped yet gets the full initial state (the
      state its first step would create, at step 0): so the template that
      ``torch.distributed.checkpoint``'s ``get_state_dict`` builds from a fresh optimizer names every
      entry, also with ``prior_mean="init"`` (whose prior means are state before any step), and a
      checkpoint has the same entries whichever parameters have stepped. A state at step 0 loads as
      "not stepped" (only the prior mean is kept), so nothing changes for those parameters;
    * the extras (the class that saved it, seed, RNG states, skip count, mode) under the top-level
      key ``"proxvi"`` and again inside the first parameter's state: ``get_optimizer_state_dict`` /
      ``set_optimizer_state_dict`` keep only ``"state"`` and ``"param_groups"``; the second copy
      survives them;
    * in eval mode (the weights hold the posterior mean, the training sample is held aside), each
      parameter's training sample as ``"held_sample"`` in its own state entry (so it shards with
      the rest of the state under FSDP2 / DCP); a parameter that holds nothing aside (it has not
      stepped) saves its weights.

    ``load_state_dict()`` runs torch's load pre-hooks, checks everything (refusing with a
    ValueError before anything changes), installs the state and the saved mode (in eval mode the
    held samples, which the next ``train()`` writes into the weights), then runs the post-hooks.
    It is refused (RuntimeError) inside ``mean_params()`` / ``sampled_params()``.
    """

    def state_dict(self) -> dict[str, Any]:
        handle = self.register_state_dict_post_hook(Checkpointing._complete_state_dict, prepend=True)
        try:
            return super().state_dict()
        finally:
            handle.remove()

    def _complete_state_dict(self, sd: dict[str, Any]) -> dict[str, Any]:
        state = dict(sd["state"])
        params = [(g, p) for g in self.param_groups for p in g["params"]]  # torch's numbering
        for i, (group, p) in enumerate(params):
            if p.requires_grad and not self._has_posterior(p):
                state[i] = {**self._initial_state(p, group), **state.get(i, {})}
            if self._mode == "eval" and isinstance(state.get(i), dict):
                # a copy of the weights where nothing is held: a template must not alias them, as
                # torch.distributed.checkpoint loads into the template's tensors in place
                held = self._held[p] if p in self._held else p.detach().clone()
                state[i] = {**state[i], HELD: held}
        extras = {"optimizer": type(self).__name__, "seed": self._seed, "skipped_steps": self.skipped_steps,
                  "rng": self._rng_states(p.device for _, p in params), "mode": self._mode}
        first = next((i for i in range(len(params)) if isinstance(state.get(i), dict)), None)
        if first is not None:
            state[first] = {**state[first], EXTRAS: extras}
        return {**sd, "state": state, EXTRAS: extras}

    def _rng_states(self, devices) -> dict[str, Tensor]:
        """The RNG state of every generator and of every device in ``devices``: one not made yet
        gives the state it will start from (so that a template from a fresh optimizer has the
        entry too)."""
        states = {dev: g.get_state() for dev, g in self._generators.items()}
        for device in devices:
            if str(device) not in states:
                states[str(device)] = torch.Generator(device=device).manual_seed(self._seed).get_state()
        return states

    def _initial_state(self, p: Tensor, group: dict) -> dict[str, Any]:
        """The state that ``p``'s first step creates (without the prior mean)."""
        state: dict[str, Any] = {}
        self._family(group).init_state(state, p, group)
        return state

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._open:
            raise RuntimeError(
                f"{type(self).__name__}.load_state_dict() called inside mean_params() or sampled_params(): "
                f"the block's end would overwrite the loaded model's weights; load after the `with` block")
        state_dict = state_dict.copy()  # shallow, as torch's
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        load = prepare(self, state_dict)  # raises before anything changes
        load.warn_absent()
        state: defaultdict[Any, dict] = defaultdict(dict)
        state.update(load.state)
        self.__setstate__({"state": state, "param_groups": load.param_groups})
        self._seed = load.seed
        self.skipped_steps = load.skipped_steps
        # the mode it was saved in: the weights are the model's (model.load_state_dict, before or
        # after); in eval mode they hold the mean, and train() writes the held training sample
        self._mode, self._held = load.mode, load.held
        for dev, g in self._generators.items():  # a generator without a saved state: the saved seed
            if dev not in load.rng:
                g.manual_seed(self._seed)
        for dev, rng_state in load.rng.items():
            self._generator(torch.device(dev)).set_state(rng_state)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(foreach=self.foreach, compiled=self.compiled, skipped_steps=self.skipped_steps,
                     _mode=self._mode, _held=self._held, _seed=self._seed, _generators=self._generators,
                     _evaluation_generators=self.__dict__.get("_evaluation_generators", {}),
                     _warned_mc_samples=self._warned_mc_samples, _open=self._open)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        opened = state.pop("_open", 0)
        super().__setstate__(state)
        if opened:
            # a copy (deepcopy, pickle) made inside mean_params() / sampled_params(): no block will
            # end for the copy, so it ends them now: its weights show what its mode says
            self._open = 0
            pairs = list(self._params(with_state=True))
            if self._mode == "train":
                self._show(self._held)
                self._held = {}
            else:
                self._show(self._summaries(pairs, "mean"))
