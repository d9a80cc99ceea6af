"""Evaluation metrics for probabilistic classifiers and regressors.

All functions are pure: they take tensors and return 0-dim (or per-example)
tensors on the input's device, computed in float64 and cast back to the
floating dtype of the main input.

Classification (``probs`` [B, C] rows summing to 1, ``targets`` int [B]):
    accuracy, nll, ece, reliability, brier, predictive_entropy
Out-of-distribution detection:
    auroc, ood_auroc
Regression:
    gaussian_nll, gaussian_mixture_nll, rmse, interval_coverage
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "accuracy",
    "nll",
    "ece",
    "reliability",
    "brier",
    "predictive_entropy",
    "auroc",
    "ood_auroc",
    "gaussian_nll",
    "gaussian_mixture_nll",
    "rmse",
    "interval_coverage",
]


# --------------------------------------------------------------------------- checks
def _check_probs(probs: Tensor) -> None:
    if not isinstance(probs, Tensor) or not probs.is_floating_point():
        raise ValueError(f"probs must be a floating-point tensor, got {getattr(probs, 'dtype', type(probs))}")
    if probs.dim() != 2:
        raise ValueError(f"probs must be 2-D [batch, classes], got shape {tuple(probs.shape)}")
    if probs.shape[0] == 0:
        raise ValueError("probs must contain at least one example, got batch size 0")


def _check_probs_targets(probs: Tensor, targets: Tensor) -> None:
    _check_probs(probs)
    if not isinstance(targets, Tensor) or targets.dtype.is_floating_point or targets.dtype.is_complex \
            or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor, got {getattr(targets, 'dtype', type(targets))}")
    if targets.dim() != 1:
        raise ValueError(f"targets must be 1-D [batch], got shape {tuple(targets.shape)}")
    if targets.shape[0] != probs.shape[0]:
        raise ValueError(f"batch size mismatch: probs has {probs.shape[0]} rows, targets has {targets.shape[0]}")
    if targets.min() < 0 or targets.max() >= probs.shape[1]:
        raise ValueError(f"targets must lie in [0, {probs.shape[1]}), got range "
                         f"[{int(targets.min())}, {int(targets.max())}]")


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shape mismatch: {shapes}")
    if next(iter(tensors.values())).numel() == 0:
        raise ValueError("inputs must be non-empty")


# --------------------------------------------------------------------------- classification
def accuracy(probs: Tensor, targets: Tensor) -> Tensor:
    """Accuracy = mean_i [argmax_c p_ic == y_i]."""
    _check_probs_targets(probs, targets)
    return (probs.argmax(dim=1) == targets).to(torch.float64).mean().to(probs.dtype)


def nll(probs: Tensor, targets: Tensor, eps: float = 1e-12) -> Tensor:
    """Negative log-likelihood = mean_i -log(max(p_{i, y_i}, eps))."""
    _check_probs_targets(probs, targets)
    p_true = probs.to(torch.float64).gather(1, targets.long().unsqueeze(1)).squeeze(1)
    return (-p_true.clamp(min=eps).log()).mean().to(probs.dtype)


def _bin_stats(probs: Tensor, targets: Tensor, n_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-bin (sum of confidence, number correct, count), float64, length n_bins.

    Bin b holds confidences in (b/n, (b+1)/n]; a confidence of exactly 0 goes to bin 0.
    """
    _check_probs_targets(probs, targets)
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    p = probs.to(torch.float64)
    conf, pred = p.max(dim=1)
    correct = (pred == targets).to(torch.float64)
    inner_edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64, device=p.device)[1:-1]
    # right=False: index b such that edge[b-1] < conf <= edge[b], i.e. right-closed bins.
    idx = torch.bucketize(conf, inner_edges, right=False)
    zeros = torch.zeros(n_bins, dtype=torch.float64, device=p.device)
    conf_sum = zeros.index_add(0, idx, conf)
    correct_sum = zeros.index_add(0, idx, correct)
    count = zeros.index_add(0, idx, torch.ones_like(conf))
    return conf_sum, correct_sum, count


def reliability(probs: Tensor, targets: Tensor, n_bins: int = 15) -> tuple[Tensor, Tensor, Tensor]:
    """Reliability-diagram data: per bin b, conf_b = mean max-prob, acc_b = mean correctness, n_b.

    Returns (bin_confidence, bin_accuracy, bin_count), each of length n_bins; confidence and
    accuracy are NaN for empty bins, counts are int64.
    """
    conf_sum, correct_sum, count = _bin_stats(probs, targets, n_bins)
    bin_conf = (conf_sum / count).to(probs.dtype)  # 0/0 -> NaN for empty bins
    bin_acc = (correct_sum / count).to(probs.dtype)
    return bin_conf, bin_acc, count.to(torch.int64)


def ece(probs: Tensor, targets: Tensor, n_bins: int = 15) -> Tensor:
    """Expected calibration error = sum_b (n_b / B) * |acc_b - conf_b| over equal-width bins.

    Written as sum_b |correct_b - confsum_b| / B, so empty bins contribute exactly 0.
    """
    conf_sum, correct_sum, _ = _bin_stats(probs, targets, n_bins)
    return ((correct_sum - conf_sum).abs().sum() / probs.shape[0]).to(probs.dtype)


def brier(probs: Tensor, targets: Tensor) -> Tensor:
    """Brier score = mean_i sum_c (p_ic - 1[c == y_i])^2 (range [0, 2])."""
    _check_probs_targets(probs, targets)
    p = probs.to(torch.float64)
    onehot = torch.nn.functional.one_hot(targets.long(), p.shape[1]).to(torch.float64)
    return ((p - onehot) ** 2).sum(dim=1).mean().to(probs.dtype)


def predictive_entropy(probs: Tensor, eps: float = 1e-12) -> Tensor:
    """Per-example entropy H_i = -sum_c p_ic * log(max(p_ic, eps)), shape [B]."""
    _check_probs(probs)
    p = probs.to(torch.float64)
    return (-(p * p.clamp(min=eps).log()).sum(dim=1)).to(probs.dtype)


# --------------------------------------------------------------------------- OOD detection
def auroc(scores: Tensor, labels: Tensor) -> Tensor:
    """Area under the ROC curve via Mann-Whitney: AUC = (R_pos - n1(n1+1)/2) / (n1 * n0).

    R_pos is the sum of the (average, 1-based) ranks of positive scores, so ties count 1/2.
    labels: 1 = positive (e.g. out-of-distribution), 0 = negative.
    """
    if scores.dim() != 1 or labels.dim() != 1:
        raise ValueError(f"scores and labels must be 1-D, got shapes {tuple(scores.shape)} and {tuple(labels.shape)}")
    if scores.shape[0] != labels.shape[0]:
        raise ValueError(f"batch size mismatch: scores has {scores.shape[0]}, labels has {labels.shape[0]}")
    if scores.is_complex() or scores.dtype == torch.bool:
        raise ValueError(f"scores must be real numbers, got dtype {scores.dtype}")
    s = scores.to(torch.float64)
    if torch.isnan(s).any():
        raise ValueError("scores contain NaN")
    lab = labels.to(torch.float64)
    if not ((lab == 0) | (lab == 1)).all():
        raise ValueError("labels must be binary (all 0 or 1)")
    n1 = int(lab.sum().item())
    n0 = lab.numel() - n1
    if n1 == 0 or n0 == 0:
        raise ValueError(f"auroc needs both classes present, got {n1} positives and {n0} negatives")
    _, inverse, counts = torch.unique(s, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).to(torch.float64)  # 1-based rank of the last element in each tie group
    avg_rank = ends - (counts.to(torch.float64) - 1) / 2
    rank_sum_pos = (avg_rank[inverse] * lab).sum()
    auc = (rank_sum_pos - n1 * (n1 + 1) / 2) / (n1 * n0)
    out_dtype = scores.dtype if scores.is_floating_point() else torch.get_default_dtype()
    return auc.to(out_dtype)


def ood_auroc(in_scores: Tensor, out_scores: Tensor) -> Tensor:
    """AUROC of separating out-of-distribution (label 1) from in-distribution (label 0) scores."""
    if in_scores.dim() != 1 or out_scores.dim() != 1:
        raise ValueError(f"in_scores and out_scores must be 1-D, got shapes "
                         f"{tuple(in_scores.shape)} and {tuple(out_scores.shape)}")
    dtype = torch.promote_types(in_scores.dtype, out_scores.dtype)
    scores = torch.cat([in_scores.to(dtype), out_scores.to(dtype)])
    labels = torch.cat([torch.zeros(in_scores.numel(), dtype=torch.long, device=scores.device),
                        torch.ones(out_scores.numel(), dtype=torch.long, device=scores.device)])
    return auroc(scores, labels)


# --------------------------------------------------------------------------- regression
def gaussian_nll(mean: Tensor, var: Tensor, targets: Tensor) -> Tensor:
    """Gaussian NLL = mean over elements of 0.5 * (log(2*pi*var) + (y - mean)^2 / var)."""
    _check_same_shape(mean=mean, var=var, targets=targets)
    if (var <= 0).any():
        raise ValueError("var must be strictly positive")
    m, v, y = (t.to(torch.float64) for t in (mean, var, targets))
    return (0.5 * (torch.log(2 * math.pi * v) + (y - m) ** 2 / v)).mean().to(mean.dtype)


def rmse(mean: Tensor, targets: Tensor) -> Tensor:
    """Root mean squared error = sqrt(mean((y - mean)^2))."""
    _check_same_shape(mean=mean, targets=targets)
    return ((mean.to(torch.float64) - targets.to(torch.float64)) ** 2).mean().sqrt().to(mean.dtype)


def gaussian_mixture_nll(means: Tensor, vars: Tensor, targets: Tensor) -> Tensor:
    r"""NLL of the equal-weight mixture of Gaussians over the leading (sample) dimension.

    ``means`` and ``vars`` are ``[S, ...]`` (one Gaussian per posterior sample), ``targets`` is
    ``[...]``: the mean over elements of :math:`-\log \frac1S \sum_s \mathcal N(y; m_s, v_s)`, the
    Bayesian predictive's test log-likelihood (negated). With ``S = 1`` it equals :func:`gaussian_nll`.
    """
    _check_same_shape(means=means, vars=vars)
    if means.dim() < 1 or means.shape[1:] != targets.shape:
        raise ValueError(f"means must be [samples, *targets.shape], got {tuple(means.shape)} "
                         f"for targets {tuple(targets.shape)}")
    if (vars <= 0).any():
        raise ValueError("vars must be strictly positive")
    m, v, y = (t.to(torch.float64) for t in (means, vars, targets))
    log_densities = -0.5 * (torch.log(2 * math.pi * v) + (y - m) ** 2 / v)
    log_mixture = torch.logsumexp(log_densities, dim=0) - math.log(means.shape[0])
    return (-log_mixture).mean().to(means.dtype)


def interval_coverage(samples: Tensor, targets: Tensor, level: float = 0.9) -> Tensor:
    """Fraction of ``targets`` inside the central ``level`` interval of predictive ``samples``.

    ``samples`` is ``[S, ...]`` draws from the predictive (noise included), ``targets`` ``[...]``;
    the interval runs between the empirical ``(1 - level)/2`` and ``(1 + level)/2`` quantiles.
    A calibrated predictive covers a fraction ``level``.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"Invalid level: {level} (must lie in (0, 1))")
    if samples.dim() < 1 or samples.shape[1:] != targets.shape:
        raise ValueError(f"samples must be [samples, *targets.shape], got {tuple(samples.shape)} "
                         f"for targets {tuple(targets.shape)}")
    s, y = samples.to(torch.float64), targets.to(torch.float64)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64, device=s.device)
    lower, upper = torch.quantile(s, q, dim=0)
    return ((y >= lower) & (y <= upper)).to(torch.float64).mean().to(samples.dtype)
