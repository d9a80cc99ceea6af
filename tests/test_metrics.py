"""Tests for torch_proxvi.metrics: hand-computed cases, independent references, bad input."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from torch_proxvi.metrics import (
    accuracy,
    auroc,
    brier,
    ece,
    gaussian_mixture_nll,
    gaussian_nll,
    interval_coverage,
    nll,
    ood_auroc,
    predictive_entropy,
    reliability,
    rmse,
)

T = torch.tensor
NAN = float("nan")


def close(actual, expected, tol=None):
    assert isinstance(actual, torch.Tensor) and actual.dim() == 0
    tol = tol if tol is not None else (1e-10 if actual.dtype == torch.float64 else 1e-6)
    assert abs(actual.item() - expected) < tol, (actual.item(), expected)


# 4 examples, 2 classes, n_bins=5 (edges 0.2, 0.4, 0.6, 0.8):
# conf 0.95 (pred 0, y 0, correct) and 0.85 (pred 0, y 1, wrong) -> bin 4 (0.8, 1.0]
# conf 0.65 (pred 1, y 1, correct) and 0.70 (pred 1, y 0, wrong) -> bin 3 (0.6, 0.8]
TWO_BIN_PROBS = T([[0.95, 0.05], [0.85, 0.15], [0.35, 0.65], [0.30, 0.70]], dtype=torch.float64)
TWO_BIN_TARGETS = T([0, 1, 1, 0])


def test_ece_two_occupied_bins():
    # bin 4: conf (0.95+0.85)/2 = 0.9, acc 1/2 -> 2/4 * |0.5-0.9| = 0.2
    # bin 3: conf (0.65+0.70)/2 = 0.675, acc 1/2 -> 2/4 * |0.5-0.675| = 0.0875
    close(ece(TWO_BIN_PROBS, TWO_BIN_TARGETS, n_bins=5), 0.2 + 0.0875)  # = 0.2875


def test_reliability_two_occupied_bins_and_consistency_with_ece():
    conf, acc, count = reliability(TWO_BIN_PROBS, TWO_BIN_TARGETS, n_bins=5)
    torch.testing.assert_close(count, T([0, 0, 0, 2, 2]))
    torch.testing.assert_close(conf, T([NAN, NAN, NAN, 0.675, 0.9], dtype=torch.float64), equal_nan=True)
    torch.testing.assert_close(acc, T([NAN, NAN, NAN, 0.5, 0.5], dtype=torch.float64), equal_nan=True)
    # ECE is the count-weighted gap of the same bins
    weighted = (count / 4 * (acc - conf).abs()).nansum()
    close(ece(TWO_BIN_PROBS, TWO_BIN_TARGETS, n_bins=5), weighted.item())


def test_bin_edges_are_right_closed_and_zero_goes_to_first_bin():
    # n_bins=4, edges 0.25, 0.5, 0.75 are exact in binary floating point.
    probs = T([[0.0, 0.0, 0.0, 0.0],       # conf 0    -> bin 0
               [0.25, 0.25, 0.25, 0.25],   # conf 0.25 -> bin 0 (0, 0.25]
               [0.5, 0.5, 0.0, 0.0],       # conf 0.5  -> bin 1 (0.25, 0.5]
               [0.75, 0.25, 0.0, 0.0],     # conf 0.75 -> bin 2 (0.5, 0.75]
               [1.0, 0.0, 0.0, 0.0]])      # conf 1.0  -> bin 3 (0.75, 1]
    _, _, count = reliability(probs, T([0, 0, 0, 0, 0]), n_bins=4)
    assert count.tolist() == [2, 1, 1, 1]


def test_perfectly_calibrated_and_maximally_wrong():
    # conf 0.75 everywhere, 3 of 4 correct -> acc 0.75 = conf -> ECE 0
    probs = T([[0.75, 0.25]] * 4)
    targets = T([0, 0, 0, 1])
    close(ece(probs, targets), 0.0)
    close(accuracy(probs, targets), 0.75)
    # one-hot and always wrong: conf 1, acc 0 -> ECE 1; Brier 1^2 + 1^2 = 2; NLL -log(1e-12)
    wrong = T([[1.0, 0.0], [0.0, 1.0]])
    wrong_targets = T([1, 0])
    close(ece(wrong, wrong_targets), 1.0)
    close(accuracy(wrong, wrong_targets), 0.0)
    close(brier(wrong, wrong_targets), 2.0)
    close(nll(wrong, wrong_targets), 12 * math.log(10), 1e-4)  # -log(1e-12) = 27.631
    # one-hot and always right: everything perfect
    close(brier(wrong, T([0, 1])), 0.0)
    close(ece(wrong, T([0, 1])), 0.0)
    close(nll(wrong, T([0, 1])), 0.0)


def test_nll_and_brier_hand_values():
    probs = T([[0.5, 0.5, 0.0], [0.2, 0.8, 0.0], [0.5, 0.3, 0.2]], dtype=torch.float64)
    targets = T([0, 1, 1])
    # NLL = (-log 0.5 - log 0.8 - log 0.3) / 3 = (0.693147 + 0.223144 + 1.203973) / 3
    close(nll(probs, targets), (math.log(2) - math.log(0.8) - math.log(0.3)) / 3)
    # Brier rows: (0.25 + 0.25 + 0) = 0.5; (0.04 + 0.04 + 0) = 0.08; (0.25 + 0.49 + 0.04) = 0.78
    close(brier(probs, targets), (0.5 + 0.08 + 0.78) / 3)  # = 0.45333...
    # argmax of row 0 is 0 (first max), row 1 is 1, row 2 is 0 != 1 -> 2/3
    close(accuracy(probs, targets), 2 / 3)


def test_predictive_entropy():
    probs = T([[0.25] * 4, [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]], dtype=torch.float64)
    # uniform over 4 -> log 4; one-hot -> 0 (0*log eps = 0); two equal -> log 2
    torch.testing.assert_close(predictive_entropy(probs), T([math.log(4), 0.0, math.log(2)], dtype=torch.float64))


def test_auroc_hand_cases():
    close(auroc(T([0.1, 0.2, 0.8, 0.9]), T([0, 0, 1, 1])), 1.0)  # perfect separation
    close(auroc(T([0.9, 0.8, 0.2, 0.1]), T([0, 0, 1, 1])), 0.0)  # reversed
    close(auroc(T([0.5, 0.5, 0.5]), T([0, 1, 1])), 0.5)  # all tied: every pair counts 1/2
    # pos {0.4, 0.8} vs neg {0.1, 0.4}: 0.4>0.1 (1), 0.4=0.4 (1/2), 0.8>both (2) -> 3.5 / 4
    close(auroc(T([0.1, 0.4, 0.4, 0.8]), T([0, 0, 1, 1])), 0.875)
    # pos {1, 2, 3} vs neg {2, 3}: 1 loses both (0), 2: tie + loss (1/2), 3: win + tie (3/2) -> 2 / 6
    close(auroc(T([1, 2, 2, 3, 3]), T([1, 0, 1, 0, 1])), 1 / 3)
    # labels as bool are accepted; same case as above
    close(auroc(T([1.0, 2, 2, 3, 3]), T([True, False, True, False, True])), 1 / 3)


def test_ood_auroc_labels_in_as_0_and_out_as_1():
    # out {0.4, 0.8} vs in {0.1, 0.4}: same as the 0.875 case above
    close(ood_auroc(T([0.1, 0.4]), T([0.4, 0.8])), 0.875)
    close(ood_auroc(T([0.4, 0.8]), T([0.1, 0.4])), 0.125)  # swapped: 1 - 0.875


def test_regression_hand_values():
    mean, var, y = T([0.0, 0.0, 0.0]), T([1.0, 1.0, 4.0]), T([0.0, 1.0, 2.0])
    # terms: 0.5*log(2pi); 0.5*(log(2pi) + 1); 0.5*(log(8pi) + 4/4)
    expected = (0.5 * math.log(2 * math.pi) + 0.5 * (math.log(2 * math.pi) + 1)
                + 0.5 * (math.log(8 * math.pi) + 1)) / 3
    close(gaussian_nll(mean, var, y), expected)
    close(rmse(T([0.0, 0.0]), T([3.0, 4.0])), math.sqrt(12.5))  # sqrt((9 + 16) / 2)


def test_gaussian_mixture_nll_against_scipy_and_single_component():
    from scipy.stats import norm

    gen = torch.Generator().manual_seed(0)
    means = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    vars_ = torch.rand(5, 7, generator=gen, dtype=torch.float64) + 0.1
    y = torch.randn(7, generator=gen, dtype=torch.float64)
    density = norm.pdf(y.numpy(), means.numpy(), np.sqrt(vars_.numpy())).mean(0)
    close(gaussian_mixture_nll(means, vars_, y), -np.log(density).mean(), tol=1e-12)
    # One component is the plain Gaussian NLL; a mixture of equal components too.
    close(gaussian_mixture_nll(means[:1], vars_[:1], y), gaussian_nll(means[0], vars_[0], y), tol=1e-12)
    close(gaussian_mixture_nll(means[:1].expand(4, 7), vars_[:1].expand(4, 7), y),
          gaussian_nll(means[0], vars_[0], y), tol=1e-12)


def test_interval_coverage_of_calibrated_and_overconfident_predictives():
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(20_000, generator=gen)
    samples = torch.randn(2000, 20_000, generator=gen)
    # A calibrated N(0, 1) predictive covers 90 % (binomial sd 0.2 %, quantile error ~0.3 %).
    assert abs(float(interval_coverage(samples, y, 0.9)) - 0.9) < 0.01
    # Half the spread covers P(|Z| < 0.822) = 0.589.
    assert abs(float(interval_coverage(0.5 * samples, y, 0.9)) - 0.589) < 0.01
    # Hand case: five draws 0..4, 80 % interval [0.4, 3.6] (linear quantiles).
    draws = torch.arange(5.0).unsqueeze(1).expand(5, 4)
    close(interval_coverage(draws, T([0.0, 1.0, 3.5, 4.0]), 0.8), 0.5)


# ---------------------------------------------------------------- independent references
def _np_ece(p: np.ndarray, y: np.ndarray, n_bins: int) -> float:
    conf, correct = p.max(1), (p.argmax(1) == y).astype(float)
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        mask = (conf > lo) & (conf <= hi) | ((b == 0) & (conf == 0))
        if mask.any():
            total += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return total


def test_against_numpy_and_sklearn_on_random_data():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 7)) * 2
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = rng.integers(0, 7, size=500)
    pt, yt = torch.from_numpy(p), torch.from_numpy(y)
    for n_bins in (1, 10, 15):
        close(ece(pt, yt, n_bins=n_bins), _np_ece(p, y, n_bins))
    close(nll(pt, yt), -np.log(p[np.arange(500), y]).mean())
    close(brier(pt, yt), ((p - np.eye(7)[y]) ** 2).sum(1).mean())
    close(accuracy(pt, yt), (p.argmax(1) == y).mean())
    scores = np.round(rng.normal(size=300), 1)  # rounding creates many ties
    labels = rng.integers(0, 2, size=300)
    close(auroc(torch.from_numpy(scores), torch.from_numpy(labels)), roc_auc_score(labels, scores))
    mu, var, t = rng.normal(size=50), rng.uniform(0.1, 3, size=50), rng.normal(size=50)
    ref = torch.nn.functional.gaussian_nll_loss(T(mu), T(t), T(var), full=True)
    close(gaussian_nll(T(mu), T(var), T(t)), ref.item())


@settings(max_examples=50, deadline=None, derandomize=True, database=None)
@given(st.lists(st.tuples(st.integers(-5, 5), st.booleans()), min_size=2, max_size=30))
def test_auroc_flip_symmetry_and_range(pairs):
    labels = T([int(b) for _, b in pairs])
    if labels.min() == labels.max():
        return
    scores = T([float(s) for s, _ in pairs])
    a = auroc(scores, labels).item()
    assert 0.0 <= a <= 1.0
    assert abs(a + auroc(-scores, labels).item() - 1.0) < 1e-6  # negating scores mirrors the ROC


def test_output_dtype_and_type():
    probs32 = TWO_BIN_PROBS.float()
    for fn in (accuracy, nll, ece, brier):
        out = fn(probs32, TWO_BIN_TARGETS)
        assert isinstance(out, torch.Tensor) and out.dim() == 0 and out.dtype == torch.float32
    assert predictive_entropy(probs32).shape == (4,)
    assert auroc(T([0.1, 0.2]), T([0, 1])).dtype == torch.float32


# ---------------------------------------------------------------- bad input
def test_bad_input_messages():
    with pytest.raises(ValueError, match=r"probs must be 2-D \[batch, classes\], got shape \(3,\)"):
        nll(T([0.2, 0.3, 0.5]), T([0]))
    with pytest.raises(ValueError, match="targets must be an integer tensor"):
        accuracy(TWO_BIN_PROBS, TWO_BIN_TARGETS.float())
    with pytest.raises(ValueError, match="batch size mismatch"):
        ece(TWO_BIN_PROBS, T([0, 1]))
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 2\)"):
        brier(TWO_BIN_PROBS, T([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="n_bins must be a positive int"):
        reliability(TWO_BIN_PROBS, TWO_BIN_TARGETS, n_bins=0)
    with pytest.raises(ValueError, match="labels must be binary"):
        auroc(T([0.1, 0.2, 0.3]), T([0, 1, 2]))
    with pytest.raises(ValueError, match="both classes present"):
        auroc(T([0.1, 0.2]), T([1, 1]))
    with pytest.raises(ValueError, match="both classes present"):
        ood_auroc(T([0.1, 0.2]), T([]))
    with pytest.raises(ValueError, match="batch size mismatch"):
        auroc(T([0.1, 0.2]), T([0, 1, 1]))
    with pytest.raises(ValueError, match="var must be strictly positive"):
        gaussian_nll(T([0.0]), T([0.0]), T([1.0]))
    with pytest.raises(ValueError, match="shape mismatch"):
        rmse(T([0.0, 1.0]), T([0.0]))
    with pytest.raises(ValueError, match=r"means must be \[samples, \*targets.shape\]"):
        gaussian_mixture_nll(T([[0.0, 1.0]]), T([[1.0, 1.0]]), T([0.0]))
    with pytest.raises(ValueError, match="vars must be strictly positive"):
        gaussian_mixture_nll(T([[0.0]]), T([[0.0]]), T([1.0]))
    with pytest.raises(ValueError, match="Invalid level: 1.5"):
        interval_coverage(T([[0.0]]), T([0.0]), 1.5)
