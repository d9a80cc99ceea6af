r"""ProxScoreOptimizer: Bayesian training as a drop-in ``torch.optim.Optimizer``.

This file holds validation, parameter groups, the step's bookkeeping and the sampling contexts;
no math. The update math is in :mod:`torch_proxvi.kernels` (the Gaussian's) and the families
(:mod:`torch_proxvi.families`), which the step reaches only through the family protocol.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import families, kernels
from ._checkpoint import Checkpointing
from ._posterior_access import PosteriorAccess
from ._validation import (
    _REQUIRED,
    NON_FINITE,
    check_group_keys,
    check_init_std,
    check_joint,
    check_sparse,
    gradient_codes,
    scores_finite,
    skip_cause,
    validate_flags,
    validate_group,
)
from .families import Family, SkipStep, sample_and_score, state_dtype
from .families.base import curvature_init_std, weight_tensors
from .kernels.newton import fine_tune_curvature

__all__ = ["ProxScoreOptimizer"]

def _shared_seed(seed: int) -> int:
    """Under torch.distributed, rank 0's seed on every rank: all ranks draw the same samples."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return seed
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([seed], dtype=torch.int64, device=device)
    dist.broadcast(value, src=0)
    return int(value.item())


class ProxScoreOptimizer(PosteriorAccess, Checkpointing, Optimizer):
    r"""Variational inference over a model's weights by proximal score matching.

    Keeps a variational posterior per parameter group: by default the mean-field Gaussian
    :math:`q = N(m, \mathrm{diag}\,\sigma^2)`; ``family`` chooses an element-wise or a dense
    flow instead (:mod:`torch_proxvi.families`). The weights
    always hold a sample :math:`\theta \sim q_t`; ``loss.backward()`` at that sample gives the
    posterior score :math:`\hat s = -N \nabla L_B / T - \lambda_0 (\theta - \mu_0)`, and ``step()``
    moves :math:`q` toward

    .. math::
        q_{t+1} = \arg\min_q \frac1K \sum_k \|\sigma_t \odot (\nabla_\theta \log q(\theta_k)
                  - \hat s(\theta_k))\|^2 + \lambda_{prox}\,\mathrm{KL}(q \,\|\, q_t)

    with ``inner_steps`` Adam steps on :math:`(m, \log\sigma)` (on every variational parameter,
    by autograd, for the flows), then writes a fresh sample
    :math:`\theta \sim q_{t+1}` into the parameters. No reparameterised gradients are needed.

    Args:
        params: parameters or parameter groups; every keyword below is also a group key
            (except ``generator``, ``foreach`` and ``compiled``).
        lr: Adam learning rate of the variational mean.
        dataset_size: number of training examples N (required).
        prior_precision: :math:`\lambda_0` of the Gaussian prior :math:`N(\mu_0, 1/\lambda_0)`.
        prior_mean: ``"zero"`` or ``"init"`` (the weights at construction; for fine-tuning).
        family: variational family: ``"gaussian"`` (mean-field, the default),
            ``"elementwise_flow"`` (a sinh-arcsinh transform per weight: skew and tails, for
            whole networks) or ``"flow"`` (a dense spline flow from zuko over a small group, e.g.
            a classifier head); see :mod:`torch_proxvi.families` and docs/api.md.
        rule: the family's update; None takes its default. The Gaussian has ``"proximal"``
            (proximal score matching by Adam steps, the default), ``"solved"`` (the proximal step
            solved per weight: the precision from the curvature, the mean by Adam or, with
            ``mean_update="newton"``, by the variance-preconditioned Newton step; docs/api.md)
            and ``"elbo"`` (the reparameterised ELBO: :class:`~torch_proxvi.ADVI`).
        init_std: initial posterior standard deviation of every weight. None (default): the
            data's, :math:`(N h_0 / T + \lambda_0)^{-1/2}`, for ``rule="solved"`` and wherever
            ``init_curvature`` :math:`h_0` (a per-example curvature guess; every family takes it)
            is given; else 1e-3. For ``rule="solved"`` without it, :math:`h_0 = 5`, and in a
            fine-tune (``prior_mean="init"``) :math:`h_0 = \max(1, L/5)`, L the number of weight
            tensors (two or more dimensions, ``requires_grad``) in all of the optimizer's groups.
            ``relative_init_curvature`` :math:`\kappa` (a family option; None, off, by default)
            starts each weight tensor of two or more dimensions relative to its own scale instead:
            :math:`P_0 = N\kappa/(T r^2) + \lambda_0`, r the tensor's RMS (docs/api.md).
        mc_samples: K, samples per step when ``step`` gets a closure.
        inner_steps: Adam steps on the proximal objective per ``step``.
        prox_weight: :math:`\lambda_{prox}` (acts from the second inner step on).
        betas, eps: Adam's coefficients for the variational parameters.
        temperature: T; the likelihood term of the score is divided by it.
        mean_update: ``"score"`` (mean follows the score alone) or ``"residual"`` (the full
            score-matching residual; ``"newton"`` instead for ``rule="solved"``, where ``lr`` is
            the fraction of the Newton step); None (default) takes the family's choice: ``"score"``
            for the Gaussian and the element-wise flow (chosen by the ablations in
            docs/method.md), ``"residual"`` for the dense flow (its only rule).
        scale_lr_ratio: the log-scales' learning rate is ``lr * scale_lr_ratio`` (for
            ``rule="solved"``: the fraction the precision moves per step); None (default) takes
            the family's: 1 for the Gaussian and the element-wise flow (0.3 for
            ``rule="solved"``), 10 for the dense flow (so that its scale, not its network, grows
            from a small ``init_std``).
        warmup_steps: optimizer steps during which only the mean moves.
        flow_options: for ``family="flow"``: ``transforms`` (pairs of affine and spline
            coupling layers), ``hidden_features`` (their hyper-networks' widths), ``bins`` (spline
            knots), ``lr_ratio`` (the flow network's lr relative to ``lr``) and ``delay`` (steps
            before the network starts to learn: the group is a mean-field Gaussian until then);
            default ``{"transforms": 2, "hidden_features": (32, 32), "bins": 8, "lr_ratio": 0.1,
            "delay": 500}``.
        generator: ``torch.Generator`` for the weight samples (default: seeded from torch's
            global RNG at construction, so ``torch.manual_seed`` makes runs repeatable; under
            ``torch.distributed`` rank 0's seed is broadcast, so every rank draws the same
            sample and, with DDP's averaged gradients, keeps the same state).
        foreach: False runs the single-tensor reference step (slow; for checking). The default
            (None or True) runs the fast path: packed flat buffers, compiled when ``compiled``
            allows.
        compiled: run the common step (no closure) as kernels compiled by ``torch.compile``
            (Inductor: a C++ compiler on CPU, Triton on CUDA), small tensors packed into shared
            calls. None (default): compile where a compiler is available, else run eagerly with
            a one-line notice (``TORCH_PROXVI_COMPILE=0`` in the environment turns the default
            off); True: require it; False: never. The first compiled step builds the kernel
            (docs/api.md gives the cost); the sample noise then comes from an in-kernel
            counter-based hash instead of torch's generator (repeatable, saved in ``state_dict``).
        **options: group keys a family adds (e.g. ``covariance`` of the GSM and BaM families).

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = ProxScoreOptimizer(model.parameters(), lr=1e-2, dataset_size=100)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> opt.zero_grad()
        >>> torch.nn.functional.cross_entropy(model(x), y).backward()
        >>> opt.step()
        >>> probs = opt.predictive(model, x, n_samples=8)

    Reference: Kim, "Large-scale Score-based Variational Posterior Inference for Bayesian Deep
    Neural Networks", arXiv:2602.05873 (2026).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        *,
        dataset_size: float = _REQUIRED,
        prior_precision: float = 1.0,
        prior_mean: str = "zero",
        family: str = "gaussian",
        rule: str | None = None,
        init_std: float | None = None,
        mc_samples: int = 1,
        inner_steps: int = 1,
        prox_weight: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        temperature: float = 1.0,
        mean_update: str | None = None,
        scale_lr_ratio: float | None = None,
        warmup_steps: int = 0,
        flow_options: dict | None = None,
        generator: torch.Generator | None = None,
        foreach: bool | None = None,
        compiled: bool | None = None,
        **options: Any,
    ):
        declared = {k for name in families.names() for k in families.get(name).options}
        for key in options:
            if key not in declared:
                raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {key!r}")
        validate_flags(foreach, compiled, generator)
        defaults = dict(
            lr=lr, dataset_size=dataset_size, prior_precision=prior_precision,
            prior_mean=prior_mean, family=family, rule=rule, init_std=init_std, mc_samples=mc_samples,
            inner_steps=inner_steps, prox_weight=prox_weight, betas=betas, eps=eps,
            temperature=temperature, mean_update=mean_update, scale_lr_ratio=scale_lr_ratio,
            warmup_steps=warmup_steps, flow_options=flow_options, **options,
        )
        self.foreach = foreach is not False
        self.skipped_steps = 0
        self._mode = "train"
        self._held: dict[Tensor, Tensor] = {}
        if generator is not None:
            self._seed = int(generator.initial_seed())
            self._generators = {str(generator.device): generator}
        else:
            self._seed = _shared_seed(int(torch.randint(0, 2**62, (1,)).item()))
            self._generators = {}
        self._default_starts: list[dict] | None = []   # groups whose fine-tune start waits for every group
        super().__init__(params, defaults)
        starts, self._default_starts = self._default_starts, None
        self._fine_tune_start(starts)
        devices = {p.device.type for g in self.param_groups for p in g["params"]}
        self.compiled = self.foreach and kernels.resolve_compiled(compiled, devices)

    # ------------------------------------------------------------------ groups and state
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        default_curvature, default_std = group.get("init_curvature") is None, group["init_std"] is None
        try:
            check_group_keys(group, self.defaults)
            validate_group(group)
            self._family(group).validate(group)
            check_init_std(group["init_std"])
            if default_curvature and group["rule"] == "solved" and group["prior_mean"] == "init":
                if getattr(self, "_default_starts", None) is None:   # after construction: from every group now
                    self._fine_tune_start([(group, default_std)])
                else:                                                # during it: once every group is in
                    self._default_starts.append((group, default_std))
        except (TypeError, ValueError, ImportError):
            self.param_groups.pop()
            raise
        if group["prior_mean"] == "init":  # the weights now, before any sample is written
            for p in group["params"]:
                self.state[p]["prior_mean"] = p.detach().to(state_dtype(p), copy=True)

    def _fine_tune_start(self, groups: list[tuple[dict, bool]]) -> None:
        """The solved rule's default ``init_curvature`` for fine-tune groups (``prior_mean="init"``,
        ``init_curvature`` not given), and their start where ``init_std`` was not given either
        (each ``(group, default_std)``): from the number of weight tensors the whole optimizer trains
        (:func:`.kernels.newton.fine_tune_curvature`), so that splitting a model into parameter
        groups (weight decay, layer-wise lr) does not change it."""
        if not groups:
            return
        h0 = fine_tune_curvature(weight_tensors(p for g in self.param_groups for p in g["params"]))
        for group, default_std in groups:
            group["init_curvature"] = h0
            if default_std:
                group["init_std"] = curvature_init_std(group)

    @staticmethod
    def _family(group: dict) -> Family:
        return families.get(group["family"])

    def _has_posterior(self, p: Tensor) -> bool:
        return "step" in self.state.get(p, ())

    def _forget(self, p: Tensor) -> None:
        """Back to the state before ``p``'s first step (only a prior mean, if any)."""
        prior_mean = self.state[p].get("prior_mean")
        if prior_mean is None:
            self.state.pop(p, None)
        else:
            self.state[p] = {"prior_mean": prior_mean}

    def _params(self, with_state: bool = False) -> Iterator[tuple[dict, Tensor]]:
        for group in self.param_groups:
            for p in group["params"]:
                if not with_state or self._has_posterior(p):
                    yield group, p

    def _state(self, p: Tensor, group: dict) -> dict[str, Tensor]:
        state = self.state[p]
        if "step" not in state:
            self._family(group).init_state(state, p, group)
        return state

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            g = torch.Generator(device=device)
            g.manual_seed(self._seed)
            self._generators[key] = g
        return self._generators[key]

    def _path(self, group: dict) -> str:
        """How the family runs the common step (:data:`torch_proxvi.kernels.PATHS`)."""
        if not self.foreach:
            return "single"
        return "compiled" if self.compiled else "flat"

    def _draw(self, pairs, generator_of: Callable[[torch.device], torch.Generator | None]
              ) -> dict[Tensor, Tensor]:
        """One posterior sample for each ``(group, p)`` of ``pairs`` (which have state).

        Element-wise families draw parameter by parameter in the order of ``pairs``; a joint
        family draws all parameters of its group at once (where the group's first one comes)."""
        out: dict[Tensor, Tensor] = {}
        for group, p in pairs:
            family = self._family(group)
            if not family.is_joint(group):
                out[p] = family.sample(group, [p], [self.state[p]], generator_of(p.device), path=self._path(group))[0]
            elif p not in out:
                params = [q for q in group["params"] if self._has_posterior(q)]
                values = family.sample(group, params, [self.state[q] for q in params], generator_of(p.device))
                out.update(zip(params, values))
        return out

    def _write_samples(self, pairs) -> None:
        """Write a fresh training sample (training RNG) into each parameter of ``pairs``."""
        for p, value in self._draw(pairs, self._generator).items():
            p.copy_(value)

    def _check_work(self, work) -> None:
        """Refuse a step before anything changes (sparse gradients, a joint family's group with
        gradients for only some of its parameters)."""
        check_sparse(work)
        check_joint(work, lambda group: self._family(group).is_joint(group))

    def _group_of(self, p: Tensor) -> dict:
        for group in self.param_groups:
            if any(p is q for q in group["params"]):
                return group
        raise ValueError("this tensor is not a parameter of the optimizer: pass one of the "
                         "tensors given to ProxScoreOptimizer(params)")

    def _batches(self, work) -> list[tuple[dict, list[Tensor]]]:
        """``work`` split into batches a family steps together: same group, device, state dtype and
        step count (the states are created here for parameters that have none yet)."""
        batches: dict[tuple, tuple[dict, list[Tensor]]] = {}
        for group, p in work:
            state = self._state(p, group)
            key = (id(group), p.device, state_dtype(p), float(state["step"]))
            batches.setdefault(key, (group, []))[1].append(p)
        return list(batches.values())

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """One proximal score-matching step; then the weights hold a fresh sample.

        Without ``closure`` the current weights (a sample of q_t) and their ``.grad`` are used.
        With ``closure`` (zero grads, forward, backward, return loss) it is called once for each
        of K = ``mc_samples`` fresh samples (the largest over the groups) and the mean of the
        returned losses is returned. A step with non-finite gradients, or with a gradient whose
        score ``dataset_size / temperature * grad`` would overflow Adam's second moment, changes
        nothing (weights, state, RNG), warns naming the cause and counts in ``skipped_steps``; so
        does a family that refuses a step whose result would not be finite; a closure that raises
        leaves everything as it was too.
        """
        self._check_step(closure)  # the weights must hold the training sample (_posterior_access)
        if closure is not None:
            loss, work, stats, undo = self._sample_and_score(closure)
            if not work:
                return loss
            batches = self._batches(work)
            saved = self._save_for_skip(batches)
            try:
                for group, params in batches:
                    self._family(group).update(group, [self.state[p] for p in params], [stats[p] for p in params],
                                               generator=self._generator(params[0].device), path=self._path(group))
            except SkipStep as refusal:
                self._restore(saved)
                undo()
                return self._skip(loss, (*refusal.args, "")[:2])
            self._write_samples(work)
            return loss
        work = [(g, p) for g, p in self._params() if p.grad is not None]
        self._check_work(work)
        cause = skip_cause(gradient_codes(work))
        if cause is not None:
            return self._skip(None, cause)
        had_state = {p for _, p in work if self._has_posterior(p)}
        batches = self._batches(work)
        saved = self._save_for_skip(batches, with_weights=True)
        rng = {dev: gen.get_state() for dev, gen in self._generators.items()} if saved else {}
        try:
            for group, params in batches:
                self._family(group).step(group, params, [self.state[p] for p in params],
                                         self._generator(params[0].device), path=self._path(group))
        except SkipStep as refusal:
            self._restore(saved)
            self._roll_back(rng, [p for _, p in work], had_state)
            return self._skip(None, (*refusal.args, "")[:2])
        return None

    def _save_for_skip(self, batches, with_weights: bool = False) -> list[tuple[Tensor, Tensor]]:
        """Copies of what a step of ``batches`` writes, when one of their families may refuse it
        (:class:`~torch_proxvi.families.SkipStep`) after an earlier batch moved: the state tensors
        (and the weights) of every batch but the last. Empty when nothing can be refused."""
        if not any(self._family(group).may_skip for group, _ in batches) or len(batches) < 2:
            return []
        saved = []
        for _, params in batches[:-1]:
            for p in params:
                saved += [(t, t.clone()) for t in self.state[p].values() if torch.is_tensor(t)]
                if with_weights:
                    saved.append((p.detach(), p.detach().clone()))
        return saved

    @staticmethod
    def _restore(saved: list[tuple[Tensor, Tensor]]) -> None:
        for tensor, copy in saved:
            tensor.copy_(copy)

    def _roll_back(self, rng: dict[str, Tensor], params: list[Tensor], had_state: set) -> None:
        """The generators back to ``rng``; the state created for ``params`` since dropped."""
        for dev, state in rng.items():
            self._generators[dev].set_state(state)
        for p in params:
            if p not in had_state:
                self._forget(p)

    def _sample_and_score(self, closure):
        """Call ``closure`` at K samples of q_t; return (mean loss, stepped params, stats, undo),
        ``undo()`` putting weights, state and RNG back as they were before (for a refused update).

        Parameters that get no gradient keep their weights and get no state. Anything that goes
        wrong (an exception, non-finite gradients) restores weights, state and RNG.
        """
        candidates = [(g, p) for g, p in self._params() if p.requires_grad]
        backup = [p.detach().clone() for _, p in candidates]
        rng = {dev: gen.get_state() for dev, gen in self._generators.items()}
        had_state = {p for _, p in candidates if self._has_posterior(p)}
        k_samples = max((g["mc_samples"] for g, _ in candidates), default=1)
        stats: dict[Tensor, Any] = {}
        losses = []

        def undo() -> None:
            for (_, p), saved in zip(candidates, backup):
                p.copy_(saved)
            self._roll_back(rng, [p for _, p in candidates], had_state)

        codes = []
        try:
            for _ in range(k_samples):
                for g, p in candidates:
                    self._state(p, g)
                self._write_samples(candidates)
                with torch.enable_grad():
                    losses.append(closure())
                with_grad = [(g, p) for g, p in candidates if p.grad is not None]
                self._check_work(with_grad)
                codes += gradient_codes(with_grad)
                for g, p in with_grad:
                    state = self.state[p]
                    stats[p] = self._family(g).collect(g, state, *sample_and_score(g, p, state), stats.get(p),
                                                       1.0 / k_samples)
        except BaseException:
            undo()
            raise
        loss = None if losses[0] is None else torch.stack(
            [torch.as_tensor(v).detach().float() for v in losses]).mean()
        cause = skip_cause(codes) or (None if scores_finite(stats) else NON_FINITE)
        if cause is not None:
            undo()
            return self._skip(loss, cause), [], {}, undo
        for (_, p), saved in zip(candidates, backup):
            if p not in stats:  # no gradient: untouched
                p.copy_(saved)
                if p not in had_state:
                    self._forget(p)
        return loss, [(g, p) for g, p in candidates if p in stats], stats, undo

    def _skip(self, loss, cause: tuple[str, str]):
        """Count and announce a skipped step; ``cause`` is (what happened, what to do)."""
        self.skipped_steps += 1
        reason, advice = cause
        warnings.warn(
            f"ProxScoreOptimizer skipped a step because of {reason} ({self.skipped_steps} skipped so far); "
            f"the posterior and the weights are unchanged. {advice}".rstrip(),
            RuntimeWarning, stacklevel=3)
        return loss
