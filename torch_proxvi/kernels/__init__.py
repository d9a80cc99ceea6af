"""The update math, each rule once, and the dispatcher that runs it.

* :mod:`.hyper`: :class:`StepHyper`, the hyperparameters of one step;
* :mod:`.score`: the posterior score from ``p.grad`` and its Monte Carlo statistics;
* :mod:`.adam`: Adam, for every Adam-based update;
* :mod:`.gaussian`: the mean-field Gaussian's Adam-based updates (``rule="proximal"``, ``rule="elbo"``);
* :mod:`.newton`: the Gaussian proximal step solved per weight (``rule="solved"``);
* :mod:`.solved`: its exact float64 reference (the global minimiser; for tests and docs);
* :mod:`.noise`: the sampler's normals (torch's generator, DTensor-aware; the compiled hash);
* :mod:`.layout`: how a batch is packed into calls (no math);
* :mod:`.dispatch`: the common step by path (``"single"``, ``"flat"``, ``"compiled"``).

docs/architecture.md draws the layers and what each module may import.
"""

from .dispatch import PATHS, RULES, resolve_compiled, step, update_from_sample
from .hyper import StepHyper
from .score import ScoreStats, accumulate, one_sample, score

__all__ = ["PATHS", "RULES", "StepHyper", "ScoreStats", "accumulate", "one_sample", "resolve_compiled", "score",
           "step", "update_from_sample"]
