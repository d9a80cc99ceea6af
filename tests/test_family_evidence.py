"""Evidence that the flow families fit non-Gaussian posteriors better than the Gaussian.

Each test fits the families through the ordinary loop (K = 1, fixed seeds, the lr decaying
linearly to zero, the same lr for every family where it suits them all) and compares KL(q || p)
(exact normaliser) and the Fisher divergence E_q |grad log q - grad log p|^2, both by Monte Carlo
over 20 000 draws of q. Margins:

* the Monte Carlo standard error of each KL estimate is below 0.01 here (the per-draw log-ratio
  has a standard deviation below 1, over 20 000 draws), so a required KL gap of 0.05 (0.1 on
  the BNN) is at least 5 standard errors;
* the flows are required to reach at most half the Gaussian's divergence, where the benchmark
  (docs/benchmarks.md, "Variational families") measured a third or less on every seed (the
  dense flow at lr 0.003: at 0.01 one seed of three diverged on the BNN);
* on the bimodal target the Fisher divergence is not compared: a Gaussian that collapses onto one
  mode has a small one (it fits that mode), the KL exposes it;
* on the BNN's last layer only what held on every seed of the benchmark is asserted: the dense
  flow (lr 0.003) has at most half the Gaussian's predictive KL to HMC (0.0003-0.001 against
  0.0026-0.0067 over 3 seeds) and a lower Fisher divergence (on this seed 2.9 against 3.2, the
  closest of the three; the others 1.4-1.6 against 3.4-7.5). Its KL(q || p) is level with the
  Gaussian's and its MMD to the HMC draws higher (docs/benchmarks.md): that part of the issue's
  claim is not met on this problem at 3000 steps.
* at 12 000 steps the element-wise flow (lr 0.03, as the Gaussian) has a lower KL, Fisher
  divergence and MMD than the Gaussian on every seed of the benchmark (KL 1.48-1.54 against
  1.58-1.62, Fisher 3.9-6.3 against 4.6-6.6 with the closest pair 6.33 against 6.62 on seed 1,
  MMD 0.075-0.093 against 0.107-0.121); the test runs seed 0 and asks for the KL gap of 0.05
  (5 standard errors) and lower Fisher divergence and MMD.
"""

from __future__ import annotations

import pytest

from torch_proxvi import ProxScoreOptimizer
from torch_proxvi import toy_targets as T

pytestmark = pytest.mark.slow


def _fit(name: str, family: str, lr: float) -> dict[str, float]:
    target = T.TARGETS[name]
    opt, theta = T.fit(target, lambda ps: ProxScoreOptimizer(
        ps, lr, dataset_size=1, prior_precision=1e-6, init_std=1.0, family=family), steps=3000)
    return T.divergences(opt, theta, target, samples=20_000)


@pytest.mark.parametrize("name", ["skew_normal", "student_t"])
def test_elementwise_flow_fits_skew_and_heavy_tails_better_than_the_gaussian(name):
    gauss, flow = _fit(name, "gaussian", 0.03), _fit(name, "elementwise_flow", 0.03)
    assert flow["kl"] < min(0.5 * gauss["kl"], gauss["kl"] - 0.02), (gauss, flow)
    assert flow["fisher"] < 0.5 * gauss["fisher"], (gauss, flow)


@pytest.mark.parametrize("name", ["banana", "bimodal"])
def test_dense_flow_fits_banana_and_two_modes_better_than_the_gaussian(name):
    gauss, flow = _fit(name, "gaussian", 0.03), _fit(name, "flow", 0.003)
    assert flow["kl"] < min(0.5 * gauss["kl"], gauss["kl"] - 0.05), (gauss, flow)
    if name == "banana":
        assert flow["fisher"] < 0.5 * gauss["fisher"], (gauss, flow)


def test_dense_flow_on_a_bnn_last_layer_has_lower_predictive_kl_and_fisher_divergence():
    problem = T.last_layer()
    results = {}
    for family in ("gaussian", "flow"):
        opt, head = T.fit_last_layer(problem, lambda ps, family=family: ProxScoreOptimizer(
            ps, 0.003 if family == "flow" else 0.03, dataset_size=len(problem.labels),
            prior_precision=1 / problem.prior_std**2, init_std=0.5, family=family), steps=3000)
        results[family] = T.last_layer_divergences(opt, head, problem, samples=20_000)
    gauss, flow = results["gaussian"], results["flow"]
    assert flow["predictive_kl"] < 0.5 * gauss["predictive_kl"], results
    assert flow["fisher"] < gauss["fisher"], results


def test_elementwise_flow_on_a_bnn_last_layer_beats_the_gaussian_on_kl_fisher_and_mmd_at_12000_steps():
    problem = T.last_layer()
    results = {}
    for family in ("gaussian", "elementwise_flow"):
        opt, head = T.fit_last_layer(problem, lambda ps, family=family: ProxScoreOptimizer(
            ps, 0.03, dataset_size=len(problem.labels), prior_precision=1 / problem.prior_std**2,
            init_std=0.5, family=family), steps=12_000)
        results[family] = T.last_layer_divergences(opt, head, problem, samples=20_000)
    gauss, flow = results["gaussian"], results["elementwise_flow"]
    assert flow["kl"] < gauss["kl"] - 0.05, results
    assert flow["fisher"] < gauss["fisher"], results
    assert flow["mmd"] < gauss["mmd"], results
