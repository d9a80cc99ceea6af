"""The dense flow's layers (torch_proxvi.families._flow_layers) are zuko's to the bit.

They recompute zuko's parameterisation with ``|u|`` written as ``u * sign(u)``, the sign held
constant, so that the proximal step's derivative of the score forms no "efficient zero" tensor
(whose additions run in Python). Checked here against zuko's own layers in float64: the map, its
log-determinant, the inverse, a score-like first derivative in x and the second derivative of
that score in the raw parameters, all equal to the bit. The raw parameters (5 times a standard
normal, and depending on x as a coupling's hyper-network makes them) reach far into the soft clip,
and x (5 times a standard normal) falls outside the spline's [-5, 5] as well as inside it.
The other tests are the reason for the layers: the score through zuko's is computed through
``sgn``, whose derivative is the efficient zero; through these, and through the dense flow
family, it is not.
"""

from __future__ import annotations

import pytest
import torch

zuko = pytest.importorskip("zuko")
from torch_proxvi.families._flow_layers import Affine, Spline  # noqa: E402

LAYERS = {
    "affine": (Affine, zuko.transforms.MonotonicAffineTransform, [(6, 4), (6, 4)]),
    "spline": (Spline, zuko.transforms.MonotonicRQSTransform, [(6, 4, 8), (6, 4, 8), (6, 4, 7)]),
}


def _layer(cls, raw: list[torch.Tensor], x: torch.Tensor):
    """The layer with raw parameters that depend on ``x``'s other coordinates, as a coupling's
    hyper-network makes them: the score in ``x`` then runs through the soft clip."""
    factor = 1 + 0.1 * x.flip(-1)
    return cls(*[r * factor.view(factor.shape + (1,) * (r.dim() - x.dim())) for r in raw])


def _derivatives(cls, raw: list[torch.Tensor], x: torch.Tensor):
    """The layer's map, log-determinant and inverse at ``x``, the score of a density built on it
    (first derivative in ``x``) and that score's derivative in the raw parameters."""
    params = [r.clone().requires_grad_() for r in raw]
    x = x.clone().requires_grad_()
    layer = _layer(cls, params, x)
    y, ladj = layer.call_and_ladj(x)
    inverse = layer.inv(y)
    (score,) = torch.autograd.grad((-0.5 * y**2 + ladj).sum(), x, create_graph=True)
    second = torch.autograd.grad((score**2).sum(), params)
    return [y, ladj, inverse, score, *second]


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("seed", [0, 1])
def test_layer_equals_zukos_in_values_and_two_derivatives(name, seed):
    ours, theirs, shapes = LAYERS[name]
    generator = torch.Generator().manual_seed(seed)
    raw = [5 * torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
    x = 5 * torch.randn(6, 4, generator=generator, dtype=torch.float64)
    assert (x.abs() > 5).any() and (x.abs() < 5).any()           # both sides of the spline's bound
    for a, b in zip(_derivatives(ours, raw, x), _derivatives(theirs, raw, x), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _graph(tensor: torch.Tensor) -> set[str]:
    """The names of the autograd nodes that ``tensor`` was computed through."""
    names, stack, seen = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_the_score_is_not_computed_through_sgn_where_zukos_is(name):
    """``abs``'s derivative is ``sgn(u) * g``; the derivative of ``sgn`` is the efficient zero.
    The score's graph through zuko's layers holds a ``SgnBackward0``, through these none."""
    ours, theirs, shapes = LAYERS[name]
    raw = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    found = {}
    for cls in (ours, theirs):
        y, ladj = _layer(cls, raw, x).call_and_ladj(x)
        (score,) = torch.autograd.grad((-0.5 * y**2 + ladj).sum(), x, create_graph=True)
        found[cls] = "SgnBackward0" in _graph(score)
    assert not found[ours], "the library's layers differentiate through sgn: the efficient zero is back"
    assert found[theirs], ("zuko's layers no longer differentiate through sgn (a torch or zuko change): "
                           "torch_proxvi/families/_flow_layers.py may no longer be needed")


def test_the_dense_flow_familys_score_is_not_computed_through_abs_or_sgn():
    from torch_proxvi import ProxScoreOptimizer
    from torch_proxvi.families import get

    weights = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = ProxScoreOptimizer([weights], lr=1e-2, dataset_size=1, family="flow")
    (weights**2).sum().backward()
    opt.step()
    family, state = get("flow"), opt.state[weights]
    theta = torch.randn(3, dtype=torch.float64, requires_grad=True)
    log_q = family._log_prob(family._parts(opt.param_groups[0], [state]), theta).sum()
    (score,) = torch.autograd.grad(log_q, theta, create_graph=True)
    assert not {"AbsBackward0", "SgnBackward0"} & _graph(score)
