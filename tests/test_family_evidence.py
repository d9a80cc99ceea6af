"""Evidence that the flow families fit non-Gaussian posteriors better than the Gaussian.

Each test fits the families through the ordinary loop (K = 1, fixed seeds, the lr decaying
linearly to zero, the same lr for every family where it suits them all) and compares KL(q || p)
(exact normaliser) and the Fisher divergence E_q |grad log q - grad log p|^2, both by Monte Carlo
over 20 000 draws of q. Margins:

* the Monte Carlo standard error of each KL estimate is below 0.01 here (the per-draw log-ratio
  has a standard deviation below 1, over 20 000 draws), so a required KL gap of 0.05 (0.1 on
  the BNN) is at least 5 standard errors;
* the flows are required to reach at most half the Gaussian's divergence, where the benchmark
  (docs/benchmarks.md, "Variational families") measured a third or less on every seed at 3000
  steps (the dense flow at lr 0.003: at 0.01 one seed of three diverged on the BNN);
* the dense flow's step budgets are the shortest of those measured (1000 to 3000) whose
  margins held with room on each of 8 seeds (`python benchmarks/evidence_margins.py --steps S
  --seeds 8`, docs/benchmarks.md, "The evidence tests' budgets"): on the bimodal target 1500
  steps (flow / Gaussian KL 0.09-0.37, gap 0.54-0.76; at 1000 the ratio reached 0.65), on the
  BNN 2000 (KL gap 1.09-1.23, Fisher 0.09-0.22, MMD 0.16-0.34, predictive KL 0.01-0.09 of the
  Gaussian's); the banana keeps 3000, since at 2000 its Fisher ratio reached 0.44 of the
  bound's 0.5 (0.49 at 1500); the dense flow from init_std 1e-3 runs 1000 steps (KL
  0.051-0.094 on 8 seeds, bound 0.2);
* on the bimodal target the Fisher divergence is not compared: a Gaussian that collapses onto one
  mode has a small one (it fits that mode), the KL exposes it;
* on the BNN's last layer the dense flow with its defaults (lr 0.003; log-scales at 10x lr, its
  network waiting 500 steps) beat the Gaussian on every metric and every seed of the benchmark
  at 3000 steps (and at the test's 2000, above): KL 0.43-0.46 against 1.59-1.65, Fisher
  0.45-0.59 against 3.4-7.5, MMD 0.017-0.024 against 0.103-0.14, predictive KL 0.0001-0.0003
  against 0.0026-0.0067. The test asks for a KL gap of 0.5 (50 standard errors) and half the
  Gaussian's other divergences.
  (Before those defaults its KL was level with the Gaussian's and its MMD higher.)
* at 12 000 steps the element-wise flow (lr 0.03, as the Gaussian) has a lower KL, Fisher
  divergence and MMD than the Gaussian on every seed of the benchmark (KL 1.48-1.54 against
  1.58-1.62, Fisher 3.9-6.3 against 4.6-6.6 with the closest pair 6.33 against 6.62 on seed 1,
  MMD 0.075-0.093 against 0.107-0.121); the test runs seed 0 and asks for the KL gap of 0.05
  (5 standard errors) and lower Fisher divergence and MMD.
"""

from __future__ import annotations

import pytest

from torch_proxvi import ProxScoreOptimizer
from torch_proxvi.reference import toy_targets as T

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def problem():
    """The two-moons BNN's last layer with its HMC reference (12 s to build; nothing mutates it)."""
    return T.last_layer()


def _fit(name: str, family: str, lr: float, steps: int = 3000) -> dict[str, float]:
    target = T.TARGETS[name]
    opt, theta = T.fit(target, lambda ps: ProxScoreOptimizer(
        ps, lr, dataset_size=1, prior_precision=1e-6, init_std=1.0, family=family), steps=steps)
    return T.divergences(opt, theta, target, samples=20_000)


@pytest.mark.parametrize("name", ["skew_normal", "student_t"])
def test_elementwise_flow_fits_skew_and_heavy_tails_better_than_the_gaussian(name):
    gauss, flow = _fit(name, "gaussian", 0.03), _fit(name, "elementwise_flow", 0.03)
    assert flow["kl"] < min(0.5 * gauss["kl"], gauss["kl"] - 0.02), (gauss, flow)
    assert flow["fisher"] < 0.5 * gauss["fisher"], (gauss, flow)


@pytest.mark.parametrize(("name", "steps"), [("banana", 3000), ("bimodal", 1500)])
def test_dense_flow_fits_banana_and_two_modes_better_than_the_gaussian(name, steps):
    gauss, flow = _fit(name, "gaussian", 0.03, steps), _fit(name, "flow", 0.003, steps)
    assert flow["kl"] < min(0.5 * gauss["kl"], gauss["kl"] - 0.05), (gauss, flow)
    if name == "banana":
        assert flow["fisher"] < 0.5 * gauss["fisher"], (gauss, flow)


def test_dense_flow_on_a_bnn_last_layer_beats_the_gaussian_on_every_metric(problem):
    results = {}
    for family in ("gaussian", "flow"):
        opt, head = T.fit_last_layer(problem, lambda ps, family=family: ProxScoreOptimizer(
            ps, 0.003 if family == "flow" else 0.03, dataset_size=len(problem.labels),
            prior_precision=1 / problem.prior_std**2, init_std=0.5, family=family), steps=2000)
        results[family] = T.last_layer_divergences(opt, head, problem, samples=20_000)
    gauss, flow = results["gaussian"], results["flow"]
    assert flow["kl"] < gauss["kl"] - 0.5, results
    assert flow["fisher"] < 0.5 * gauss["fisher"], results
    assert flow["mmd"] < 0.5 * gauss["mmd"], results
    assert flow["predictive_kl"] < 0.5 * gauss["predictive_kl"], results


def test_elementwise_flow_on_a_bnn_last_layer_beats_the_gaussian_on_kl_fisher_and_mmd_at_12000_steps(problem):
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


def test_dense_flow_trains_from_a_networks_init_std_with_its_defaults():
    # From init_std=1e-3 (the library default) on a correlated Gaussian (rho 0.9, unit scale),
    # where no mean-field family gets below KL 0.83. The flow's defaults (log-scales at 10x lr,
    # its network waiting 500 steps) measured KL 0.051-0.094 at 1000 steps on 8 seeds (0.013-0.028
    # at 1500; `python benchmarks/evidence_margins.py --steps 1000 --seeds 8 --cases start`);
    # before them, 3.3 at 3000 steps from init_std 0.01, diverging at 12 000
    # (benchmarks/flow_start.py). The bound, 0.2, is a quarter of the mean-field optimum and
    # some 10 Monte Carlo standard errors above the worst seed.
    target = T.correlated_gaussian(0.9)
    opt, theta = T.fit(target, lambda ps: ProxScoreOptimizer(ps, 0.003, dataset_size=1, prior_precision=1e-6,
                                                             family="flow"), steps=1000)
    result = T.divergences(opt, theta, target, samples=20_000)
    assert result["kl"] < 0.2, result
