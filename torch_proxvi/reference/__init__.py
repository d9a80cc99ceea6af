"""Evaluation tooling that is not training: reference posteriors and the data the benchmarks use.

* :mod:`.hmc`: a validated HMC sampler (long-run MCMC reference posteriors);
* :mod:`.toy_targets`: 1-D and 2-D targets and a BNN last layer with exact or HMC answers;
* :mod:`.testing`: Bayesian linear regression (closed-form optimal mean-field posterior) and a
  tracker of the bytes of tensors a block allocates;
* :mod:`.datasets`: the offline datasets of the benchmarks and examples, located on this machine.
* :mod:`.comparators`: IVON driven as the benchmarks and examples drive it (its training sample,
  its seeded predictive draws, its posterior std).

Nothing in :mod:`torch_proxvi`'s optimizers imports this package.
"""
