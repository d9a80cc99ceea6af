"""Loading and saving state (issue 18, items 1-3 and 9): what ``load_state_dict`` refuses, what
it converts, and that a refused load changes nothing. The generic torch.optim contracts (hooks,
non-parameter keys, a step stored as a Python number) are in test_contract.py, over every
optimizer of the package."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import build_data, build_model
from helpers import assert_all_equal, assert_nested_equal, weights

from torch_proxvi import ADVI, GSM, BaM, ProxScoreOptimizer

CLASSES = {"ProxScoreOptimizer": ProxScoreOptimizer, "ADVI": ADVI, "GSM": GSM, "BaM": BaM}
LR = {"ProxScoreOptimizer": 1e-2, "ADVI": 1e-2, "GSM": 0.3, "BaM": 1.0}


def make(name="ProxScoreOptimizer", seed=0, **kw):
    model = build_model(seed)
    torch.manual_seed(seed + 1000)  # the optimizer's seed
    return model, CLASSES[name](model.parameters(), **{"lr": LR[name], "dataset_size": 64, **kw})


def train(model, opt, steps, start=0):
    for i in range(steps):
        x, y = build_data(100 + start + i)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def everything(model, opt) -> dict:
    """A deep copy of all a load could change: state, groups, seed, skips, RNG, weights."""
    index = {id(p): i for i, p in enumerate(model.parameters())}
    return copy.deepcopy({
        "state": {index[id(p)] if torch.is_tensor(p) else p: v for p, v in opt.state.items()},
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
        "seed": opt._seed, "skipped": opt.skipped_steps,
        "rng": {dev: g.get_state() for dev, g in opt._generators.items()},
        "weights": weights(model)})


def resumes_identically(edit, **kw):
    """Load the state_dict after 2 steps, changed by ``edit``, into a fresh optimizer of other
    seeds: 3 more steps of both give the same weights bit for bit."""
    model, opt = make(**kw)
    train(model, opt, 2)
    sd = copy.deepcopy(opt.state_dict())  # torch's state_dict holds the live state
    edit(sd)
    model2, opt2 = make(seed=7, **kw)
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(sd)
    train(model, opt, 3, start=2)
    train(model2, opt2, 3, start=2)
    assert_all_equal(weights(model2), weights(model), "the resumed run diverged")
    return opt2


def copies_of_extras(sd) -> list[dict]:
    """The extras at the top level and inside the first parameter's state (one object, or two
    after a round trip through storage)."""
    return list({id(e): e for e in (sd["proxvi"], sd["state"][0]["proxvi"])}.values())


# ---------------------------------------------------------------------------- item 1: DCP template
@pytest.mark.parametrize("prior_mean", ["zero", "init"])
def test_dcp_resume_from_a_fresh_optimizers_template_is_bit_identical(tmp_path, prior_mean):
    """The documented FSDP2 recipe in one process: with prior_mean="init" the fresh optimizer's
    state held only the prior means, so get_state_dict's template had that key alone and dcp.load
    filled nothing else: the posterior was silently lost."""
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, opt = make(prior_mean=prior_mean)
    train(model, opt, 2)
    model_sd, optim_sd = get_state_dict(model, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group": a single-process checkpoint
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path))
        model2, opt2 = make(seed=7, prior_mean=prior_mean)
        model_sd, optim_sd = get_state_dict(model2, opt2)
        loaded = {"model": model_sd, "optim": optim_sd}
        dcp.load(loaded, checkpoint_id=str(tmp_path))
    set_state_dict(model2, opt2, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    for a, b in zip(model.parameters(), model2.parameters()):
        assert sorted(opt.state[a]) == sorted(opt2.state[b])
    train(model, opt, 3, start=2)
    train(model2, opt2, 3, start=2)
    assert_all_equal(weights(model2), weights(model), "the resumed run diverged")


@pytest.mark.parametrize("prior_mean", ["zero", "init"])
def test_state_dict_before_the_first_step_names_every_entry_and_loads_as_not_started(prior_mean):
    model, opt = make(prior_mean=prior_mean)
    fresh = opt.state_dict()
    train(model, opt, 1)
    for pid, entry in opt.state_dict()["state"].items():
        assert sorted(fresh["state"][pid]) == sorted(entry)
    model2, opt2 = make(seed=7, prior_mean=prior_mean)
    opt2.load_state_dict(fresh)     # step 0: the state a first step creates, so nothing started
    expected = {"prior_mean"} if prior_mean == "init" else set()
    assert all(set(opt2.state.get(p, ())) == expected for p in model2.parameters())


@pytest.mark.parametrize("key", ["mean", "log_scale", "mean_exp_avg_sq", "step", "prior_mean"])
def test_a_partial_parameter_state_is_refused(key):
    model, opt = make(prior_mean="init")
    train(model, opt, 2)
    sd = opt.state_dict()
    sd["state"][1] = {k: v for k, v in sd["state"][1].items() if k != key}
    before = everything(model, opt)
    with pytest.raises(ValueError, match="partial state"):
        opt.load_state_dict(sd)
    assert_nested_equal(everything(model, opt), before)


def test_a_state_with_only_the_prior_mean_loads_as_not_started():
    """What state_dict saved before this version for a parameter that had not stepped."""
    model, opt = make(prior_mean="init")
    sd = opt.state_dict()
    sd["state"] = {pid: {"prior_mean": st["prior_mean"]} for pid, st in sd["state"].items()}
    model2, opt2 = make(seed=7, prior_mean="init")
    opt2.load_state_dict(sd)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert list(opt2.state[q]) == ["prior_mean"] and torch.equal(opt2.state[q]["prior_mean"], p.detach())


# ---------------------------------------------------------------------------- item 2: another optimizer
PAIRS = [(a, b) for a in CLASSES for b in CLASSES if a != b]


@pytest.mark.parametrize(("saved_by", "loaded_by"), PAIRS, ids=[f"{a}->{b}" for a, b in PAIRS])
def test_another_optimizers_state_dict_is_refused_naming_both(saved_by, loaded_by):
    model, opt = make(saved_by)
    train(model, opt, 2)
    sd = opt.state_dict()
    model2, opt2 = make(loaded_by, seed=3)
    train(model2, opt2, 1)
    before = everything(model2, opt2)
    with pytest.raises(ValueError, match=rf"saved by {saved_by}, and this is {loaded_by}"):
        opt2.load_state_dict(sd)
    assert_nested_equal(everything(model2, opt2), before)


def test_a_state_dict_without_the_class_entry_loads_if_consistent():
    """Checkpoints of this package before the class was recorded."""
    def edit(sd):
        for extras in copies_of_extras(sd):
            del extras["optimizer"]

    resumes_identically(edit)


def test_an_old_advi_state_dict_is_refused_by_its_rule():
    model, opt = make("ADVI")
    train(model, opt, 2)
    sd = opt.state_dict()
    for extras in copies_of_extras(sd):
        del extras["optimizer"]
    _, opt2 = make()
    with pytest.raises(ValueError, match="rule='elbo' where this optimizer's has rule='proximal'"):
        opt2.load_state_dict(sd)


def test_a_torch_adam_state_dict_is_refused():
    model, _ = make()
    adam = torch.optim.Adam(model.parameters())
    model(build_data()[0]).sum().backward()
    adam.step()
    _, opt = make()
    with pytest.raises(ValueError, match="not saved by ProxScoreOptimizer"):
        opt.load_state_dict(adam.state_dict())


# ---------------------------------------------------------------------------- item 3: nothing half-loaded
def _set(path, value):
    def corrupt(sd):
        target = sd
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value(target[path[-1]]) if callable(value) else value
    return corrupt


def _drop_extras_key(key):
    def corrupt(sd):
        for extras in copies_of_extras(sd):
            del extras[key]
    return corrupt


def _rng(value):
    def corrupt(sd):
        for extras in copies_of_extras(sd):
            extras["rng"] = {"cpu": value, "cuda:99": torch.zeros(16, dtype=torch.uint8)}
    return corrupt


CORRUPTIONS = {
    "lr=-1": (_set(["param_groups", 0, "lr"], -1.0), "Invalid learning rate"),
    "dataset_size=0": (_set(["param_groups", 0, "dataset_size"], 0), "Invalid dataset_size"),
    "unknown family": (_set(["param_groups", 0, "family"], "nope"), "Invalid family"),
    "other family": (_set(["param_groups", 0, "family"], "elementwise_flow"), "family='elementwise_flow'"),
    "betas": (_set(["param_groups", 0, "betas"], (0.9, 1.5)), "Invalid betas"),
    "group size": (_set(["param_groups", 0, "params"], lambda ids: ids[:-1]), "does not match this model"),
    "shape": (_set(["state", 1, "mean"], lambda v: v[:-1]), "does not match this model"),
    "int state": (_set(["state", 1, "mean"], lambda v: v.long()), "real floating point"),
    "step -1": (_set(["state", 1, "step"], torch.tensor(-1.0)), "not a whole number"),
    "step nan": (_set(["state", 1, "step"], float("nan")), "not a whole number"),
    "step str": (_set(["state", 1, "step"], "3"), "not a whole number"),
    "state not a dict": (_set(["state", 1], 3), "not a dict"),
    "no seed": (_drop_extras_key("seed"), "lacks"),
    "bad seed": (_set(["proxvi", "seed"], -4), "seed"),
    "rng dtype": (_rng(torch.zeros(5056, dtype=torch.int64)), "not a 1-D uint8 tensor"),
    "rng size": (_rng(torch.zeros(7, dtype=torch.uint8)), "not one a cpu generator accepts"),
    "rng device name": (_set(["proxvi", "rng"], {"gpu7": torch.zeros(16, dtype=torch.uint8)}), "names the device"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_a_refused_load_changes_nothing(name):
    corrupt, message = CORRUPTIONS[name]
    model, opt = make()
    train(model, opt, 2)
    sd = copy.deepcopy(opt.state_dict())
    corrupt(sd)
    model2, opt2 = make(seed=3)
    train(model2, opt2, 1)
    before = everything(model2, opt2)
    with pytest.raises(ValueError, match=message):
        opt2.load_state_dict(sd)
    assert_nested_equal(everything(model2, opt2), before)
    train(model2, opt2, 1)  # and it still works


def test_a_gpu_checkpoint_loads_on_a_machine_without_that_gpu():
    """The RNG state of an absent device is left out with a warning; the devices present start
    from the saved seed, so two optimizers that load it agree."""
    model, opt = make()
    train(model, opt, 2)
    sd = opt.state_dict()
    for extras in copies_of_extras(sd):
        extras["rng"] = {"cuda:99": torch.zeros(16, dtype=torch.uint8)}  # as if saved on a GPU
    runs = []
    for seed in (3, 4):
        model2, opt2 = make(seed=seed)
        train(model2, opt2, 1)  # its CPU generator has moved: the load must reset it
        model2.load_state_dict(model.state_dict())
        with pytest.warns(RuntimeWarning, match="cuda:99, which this machine does not have"):
            opt2.load_state_dict(sd)
        for p, q in zip(model.parameters(), model2.parameters()):
            assert torch.equal(opt2.posterior_mean(q), opt.posterior_mean(p))
        with opt2.mean_params():  # evaluation works
            model2(build_data()[0])
        train(model2, opt2, 2, start=2)
        runs.append(weights(model2))
    assert_all_equal(runs[0], runs[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_state_of_another_float_dtype_is_cast_to_the_state_dtype(dtype):
    """The rule: every state tensor becomes the parameter's state dtype (float32; float64 for
    float64 weights), as torch casts Adam's state to the parameter's dtype."""
    model, opt = make()
    train(model, opt, 2)
    sd = opt.state_dict()
    sd["state"] = {pid: {k: v.to(dtype) if torch.is_tensor(v) and k != "step" else v for k, v in st.items()}
                   for pid, st in sd["state"].items()}
    _, opt2 = make(seed=3)
    opt2.load_state_dict(sd)
    for st, saved in zip(opt2.state.values(), sd["state"].values()):
        for k, v in st.items():
            if k != "step":
                assert v.dtype == torch.float32 and torch.equal(v, saved[k].float())


def test_a_float64_model_keeps_float64_state():
    model = build_model(dtype=torch.float64)
    opt = ProxScoreOptimizer(model.parameters(), lr=1e-2, dataset_size=64)
    x, y = build_data(dtype=torch.float64)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["mean"] = sd["state"][0]["mean"].float()
    opt.load_state_dict(sd)
    assert all(v.dtype == torch.float64 for st in opt.state.values() for k, v in st.items() if k != "step")


@pytest.mark.parametrize("foreach", [False, None], ids=["single", "default"])
def test_warmup_ends_after_loading_a_step_stored_as_a_python_number(foreach):
    """Torch's older format: the step, a Python number, becomes torch's float32 tensor and
    advances (it did not on the single path, so warm-up never ended; the flat path crashed)."""
    def edit(sd):
        for st in sd["state"].values():
            st["step"] = int(st["step"])

    opt2 = resumes_identically(edit, warmup_steps=4, foreach=foreach)
    for p in opt2.param_groups[0]["params"]:
        assert torch.is_tensor(opt2.state[p]["step"]) and float(opt2.state[p]["step"]) == 5
        assert not torch.equal(opt2.posterior_std(p), torch.full_like(p, 1e-3, dtype=torch.float32))
