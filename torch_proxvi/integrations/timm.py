"""timm registration: ``timm.optim.create_optimizer_v2(model, "proxvi", lr=..., dataset_size=...)``.

Importing this module registers the name ``"proxvi"`` in timm's optimizer registry (call
:func:`register` again after a registry reset; it is idempotent)::

    import timm
    import torch_proxvi.integrations.timm  # noqa: F401  (registers "proxvi")

    model = timm.create_model("resnet18", num_classes=10)
    opt = timm.optim.create_optimizer_v2(model, "proxvi", lr=1e-3, dataset_size=50_000,
                                         prior_mean="init")

timm always passes ``weight_decay`` (and builds weight-decay parameter groups when it is > 0).
In a Bayesian model the prior plays that role, so ``weight_decay`` is accepted and has no
effect; a non-zero value warns and names ``prior_precision``, the knob that does. Every other
keyword goes to :class:`~torch_proxvi.ProxScoreOptimizer`.
"""

from __future__ import annotations

import warnings

from ..optimizer import ProxScoreOptimizer

__all__ = ["TimmProxScoreOptimizer", "register"]


class TimmProxScoreOptimizer(ProxScoreOptimizer):
    """:class:`~torch_proxvi.ProxScoreOptimizer` that also accepts timm's ``weight_decay``."""

    def __init__(self, params, lr: float = 1e-3, *, weight_decay: float = 0.0, **kwargs):
        super().__init__(params, lr, **kwargs)
        # timm puts the decay into the parameter groups when it splits decay / no-decay params
        decay = weight_decay or max((g.get("weight_decay", 0.0) for g in self.param_groups), default=0.0)
        if decay:
            warnings.warn(
                f"weight_decay={decay} has no effect on ProxScoreOptimizer: the Gaussian prior "
                f"replaces it; set prior_precision (and prior_mean='init' when fine-tuning) instead",
                UserWarning, stacklevel=3)


def register() -> None:
    """Register ``"proxvi"`` in timm's default optimizer registry."""
    from timm.optim._optim_factory import OptimInfo, default_registry

    default_registry.register(OptimInfo(
        name="proxvi", opt_class=TimmProxScoreOptimizer, has_eps=True, has_betas=True,
        description="Proximal score-matching variational inference (torch_proxvi)"))


register()
