"""Shared fixtures for the optimizer test suites.

``OPTIMIZERS`` is the generic contract table: a new Bayesian optimizer (ADVI, GSM, BaM, ...)
joins ``test_contract.py`` (and the generic parts of ``test_errors.py``) by one entry here.
Every entry is ``factory(params, **overrides) -> optimizer`` and the optimizer must provide
``step(closure=None)``, ``zero_grad``, ``state_dict``/``load_state_dict``, ``add_param_group``,
``posterior_mean(p)``, ``posterior_std(p)``, ``mean_params()``, ``sampled_params()``,
``train()``, ``eval()`` and ``predictive(model, inputs, n_samples=..., likelihood=...)``, and
accept the keyword options ``lr``, ``dataset_size`` and ``mc_samples``.
"""

from __future__ import annotations

import os

# The optimizers' default path compiles where a C++ compiler exists; each kernel specialisation
# costs ~15 s to build on 2 cores. Tests that do not choose a path run eagerly; the path axis
# below and tests/test_paths.py choose the compiled one explicitly.
os.environ.setdefault("TORCH_PROXVI_COMPILE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from torch_proxvi import ADVI, GSM, BaM, ProxScoreOptimizer  # noqa: E402

# One intra-op thread. The suite's tensors are small, where torch's thread pool costs more than it
# saves, and its workers spin against whatever else the machine runs: 300 steps of a 2-D flow took
# 4.2 s with one thread and 55 s with two on 2 cores shared with another job. Every path is
# compared within one process, so the thread count changes no assertion; a test that wants
# threads sets them. `make test` uses the other cores through one pytest worker per core
# (pytest-xdist): about 5 minutes instead of 9 serially on a 2-core EPYC with AVX-512, 6.5 to 7.5 on
# one without (by load); the longest tests are the dense flow's evidence (docs/benchmarks.md, "The
# evidence tests' budgets", "`make test`'s time on a clean clone").
torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """The tests marked ``slow`` first (otherwise in collection order): pytest-xdist's workers then
    start on the long tests and share the short ones at the end, instead of one worker starting
    a 90 s test while the other has nothing left to run."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)

OPTIMIZERS = {
    "proxscore": lambda params, **kw: ProxScoreOptimizer(
        params, **{"lr": 1e-2, "dataset_size": 64, **kw}
    ),
    "proxscore_elementwise_flow": lambda params, **kw: ProxScoreOptimizer(
        params, **{"lr": 1e-2, "dataset_size": 64, "family": "elementwise_flow", **kw}
    ),
    "proxscore_flow": lambda params, **kw: ProxScoreOptimizer(  # a small flow: the contract, not capacity
        params, **{"lr": 1e-2, "dataset_size": 64, "family": "flow",
                   "flow_options": {"transforms": 1, "hidden_features": (8,)}, **kw}
    ),
    "advi": lambda params, **kw: ADVI(params, **{"lr": 1e-2, "dataset_size": 64, **kw}),
    # rule="solved" (the precision solved per weight): the Adam mean and the Newton mean
    "proxscore_solved": lambda params, **kw: ProxScoreOptimizer(
        params, **{"lr": 1e-2, "dataset_size": 64, "rule": "solved", **kw}
    ),
    "proxscore_solved_newton": lambda params, **kw: ProxScoreOptimizer(
        params, **{"lr": 0.1, "dataset_size": 64, "rule": "solved", "mean_update": "newton", **kw}
    ),
    # the path axis (torch_proxvi.kernels.dispatch.PATHS): the entries above take the default
    # path (flat: conftest turns compiling off); these the reference and the compiled one, the
    # latter with its kernel body run eagerly (same calls, layout and hashed noise; no build):
    # tests/test_paths.py checks the built kernel against that body
    "proxscore[single]": lambda params, **kw: ProxScoreOptimizer(
        params, **{"lr": 1e-2, "dataset_size": 64, "foreach": False, **kw}
    ),
    "proxscore[compiled]": lambda params, **kw: ProxScoreOptimizer(
        params, **{"lr": 1e-2, "dataset_size": 64, "compiled": True, **kw}
    ),
    "advi[single]": lambda params, **kw: ADVI(params, **{"lr": 1e-2, "dataset_size": 64, "foreach": False, **kw}),
    "advi[compiled]": lambda params, **kw: ADVI(params, **{"lr": 1e-2, "dataset_size": 64, "compiled": True, **kw}),
    "proxscore_solved[single]": lambda params, **kw: ProxScoreOptimizer(
        params, **{"lr": 1e-2, "dataset_size": 64, "rule": "solved", "foreach": False, **kw}
    ),
    "proxscore_solved_newton[compiled]": lambda params, **kw: ProxScoreOptimizer(
        params, **{"lr": 0.1, "dataset_size": 64, "rule": "solved", "mean_update": "newton", "compiled": True, **kw}
    ),
    "gsm": lambda params, **kw: GSM(params, **{"lr": 0.3, "dataset_size": 64, **kw}),
    "bam": lambda params, **kw: BaM(params, **{"lr": 1.0, "dataset_size": 64, **kw}),
}
# An lr whose few steps move the posterior mean by far less than bf16's spacing (~1e-3) yet
# visibly in float32: Adam-type updates move by ~lr; GSM's and BaM's lr scale a closed-form
# step of the order of the posterior std (1e-3 at init), so they need a larger value.
SMALL_LR = {"proxscore": 1e-5, "proxscore_elementwise_flow": 1e-5, "proxscore_flow": 1e-5,
            "advi": 1e-5, "gsm": 1e-2, "bam": 1e-2}
SMALL_LR.update({"proxscore_solved": 1e-5, "proxscore_solved_newton": 1e-5})
SMALL_LR.update({f"{name}[{path}]": SMALL_LR[name]
                 for name in ("proxscore", "advi", "proxscore_solved", "proxscore_solved_newton")
                 for path in ("single", "compiled")})
# Families that model a whole group jointly refuse a step where only some of its parameters got
# a gradient (there is no marginal to update): the contract tests check that refusal instead.
JOINT = {"proxscore_flow"}
for _name, _factory in OPTIMIZERS.items():
    _factory.small_lr = SMALL_LR[_name]
    _factory.joint = _name in JOINT

N_FEATURES = 5
N_HIDDEN = 8
N_CLASSES = 3
BATCH = 16


def build_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """``Linear(5, 8) -> Tanh -> Linear(8, 3)``, initialised from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(N_FEATURES, N_HIDDEN), nn.Tanh(),
                          nn.Linear(N_HIDDEN, N_CLASSES))
    return model.to(dtype)


def build_data(seed: int = 1, n: int = BATCH, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, N_FEATURES, generator=g, dtype=dtype)
    y = torch.randint(0, N_CLASSES, (n,), generator=g)
    return x, y


def train_step(model: nn.Module, opt, x: torch.Tensor, y: torch.Tensor):
    """One ordinary training-loop iteration (zero_grad, cross-entropy backward, step)."""
    opt.zero_grad()
    loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    opt.step()
    return loss.detach()


def snapshot(opt) -> dict:
    """A deep copy of every tensor (and scalar) in ``opt.state``, keyed by parameter index."""
    params = [p for g in opt.param_groups for p in g["params"]]
    out = {}
    for i, p in enumerate(params):
        if p in opt.state and opt.state[p]:
            out[i] = {k: (v.detach().clone() if torch.is_tensor(v) else v)
                      for k, v in opt.state[p].items()}
    return out


def assert_same_state(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for i in before:
        assert before[i].keys() == after[i].keys(), i
        for k, v in before[i].items():
            w = after[i][k]
            if torch.is_tensor(v):
                assert v.dtype == w.dtype and torch.equal(v, w), (i, k)
            else:
                assert v == w, (i, k)


@pytest.fixture(params=list(OPTIMIZERS), ids=list(OPTIMIZERS))
def make_opt(request):
    """``make_opt(params, **overrides)`` for each optimizer of the contract table."""
    if request.param.endswith("[compiled]"):
        monkeypatch = request.getfixturevalue("monkeypatch")
        from torch_proxvi.kernels import dispatch

        monkeypatch.setattr(dispatch, "compiled_kernel", lambda: dispatch.kernel_body)
        monkeypatch.setattr(dispatch, "compiler_available", lambda device_type: True)
    return OPTIMIZERS[request.param]


# The helpers as session-scoped fixtures (usable from hypothesis tests too).
@pytest.fixture(scope="session")
def make_model():
    return build_model


@pytest.fixture(scope="session")
def make_data():
    return build_data


@pytest.fixture
def data():
    return build_data()


@pytest.fixture(scope="session")
def train():
    return train_step


@pytest.fixture
def trained(make_opt, make_model, data, train):
    """A model and its optimizer (from ``make_opt``) after three training steps."""
    model = make_model()
    opt = make_opt(model.parameters())
    x, y = data
    for _ in range(3):
        train(model, opt, x, y)
    return model, opt


@pytest.fixture(scope="session")
def state_snapshot():
    return snapshot


@pytest.fixture(scope="session")
def same_state():
    return assert_same_state


@pytest.fixture
def fake_fashion_mnist(tmp_path, monkeypatch):
    """Generated Fashion-MNIST IDX files (600 training, 100 test images of noise) that the loader finds
    through $TORCH_PROXVI_FASHION_MNIST: no test needs the Debian package dataset-fashion-mnist."""
    from torch_proxvi.reference import datasets

    directory = datasets.write_fake_fashion_mnist(tmp_path / "fashion-mnist", n_train=600, n_test=100)
    monkeypatch.setenv(datasets.FASHION_MNIST_ENV, str(directory))
    return directory
