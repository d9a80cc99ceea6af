"""Variational families: how each stores, samples and summarises its per-parameter state."""

from . import gaussian

__all__ = ["gaussian"]
