"""Fault injection: training killed at random points resumes from the last complete checkpoint and
ends bit-identical to an uninterrupted run; for a plain loop (``torch_proxvi.checkpoint_io``), the
Hugging Face Trainer and ``torch.distributed.checkpoint`` (FSDP2, one gloo rank), with
``prior_mean`` "zero" and "init". Plus the helper itself: ``checkpoint_io.save`` is atomic where
``torch.save`` leaves a torn file.

The kills are real. One subprocess per test module (a "zygote") imports torch, transformers and
torch.distributed once and forks a fresh process per attempt (the reference run too, so both run
the same way); an attempt dies, at a point drawn from a fixed seed, by

- ``step``: SIGKILL right after ``optimizer.step()`` of step t (before that step's checkpoint);
- ``save``: SIGXFSZ from the kernel in the middle of writing the checkpoint of step t: the attempt
  lowers RLIMIT_FSIZE to a seeded fraction of the checkpoint's size, so the write that crosses it
  kills the process with the file cut at that byte (no Python code runs after);
- ``replace``: SIGKILL when the complete checkpoint is about to be renamed into place.

The next attempt resumes from the last complete checkpoint (the test checks which one, against
the kill schedule), in a new process whose model is built from another seed and whose optimizer has
another generator: only what the checkpoint restores (weights, posterior, prior mean, RNG, scheduler,
torch's RNG for dropout) can make it match. The kills need POSIX (fork, RLIMIT_FSIZE, SIGKILL).
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_nested_equal
from torch import nn

from torch_proxvi import ProxScoreOptimizer, checkpoint_io

try:
    import resource
except ImportError:  # Windows
    resource = None

posix_only = pytest.mark.skipif(resource is None or not hasattr(os, "fork"),
                                reason="the kills need POSIX: fork, RLIMIT_FSIZE and SIGKILL")

STEPS, EVERY, BATCH, N_DATA = 12, 3, 8, 64
SAVES = list(range(EVERY, STEPS + 1, EVERY))
TESTS = Path(__file__).resolve().parent
SIGKILL, SIGXFSZ = getattr(signal, "SIGKILL", None), getattr(signal, "SIGXFSZ", None)
SIGNAL_OF = {"step": SIGKILL, "replace": SIGKILL, "save": SIGXFSZ}


# ---------------------------------------------------------------------------- the training, in an attempt
def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 3))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N_DATA, 6, generator=g), torch.randint(0, 3, (N_DATA,), generator=g)


def _seeds(job, resumed):
    """The model's and the generator's seed: a resumed attempt uses others on purpose."""
    return (1000 + job["attempt"], 2000 + job["attempt"]) if resumed else (0, 5)


def _optimizer(model, job, generator_seed):
    return ProxScoreOptimizer(model.parameters(), lr=1e-2, dataset_size=N_DATA, init_std=0.05,
                              prior_mean=job["prior_mean"],
                              generator=torch.Generator().manual_seed(generator_seed))


def _train_step(model, opt, sched, data, t):
    x, y = data
    epoch, k = divmod(t - 1, N_DATA // BATCH)
    idx = torch.randperm(N_DATA, generator=torch.Generator().manual_seed(100 + epoch))[k * BATCH:(k + 1) * BATCH]
    opt.zero_grad()
    F.cross_entropy(model(x[idx]), y[idx]).backward()
    opt.step()
    sched.step()


def _kill_now():
    os.kill(os.getpid(), SIGKILL)


def _after_step(job, t):
    kill = job["kill"]
    if kill and kill["kind"] == "step" and kill["at"] == t:
        _kill_now()


def _cut_at(job) -> int:
    """The byte at which a ``save`` kill cuts the write: a seeded fraction of the largest file of
    the same checkpoint in the reference run (so the cut falls inside that file at least)."""
    files = REFERENCE_FILES[job["stack"]](Path(job["ref"]), job["kill"]["at"])
    return int(job["kill"]["frac"] * max(os.path.getsize(f) for f in files))


def _before_save(job, t):
    """Arms a ``save`` or ``replace`` kill for the checkpoint about to be written at step t."""
    kill = job["kill"]
    if not kill or kill["at"] != t:
        return
    if kill["kind"] == "save":
        resource.setrlimit(resource.RLIMIT_FSIZE, (_cut_at(job), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    elif kill["kind"] == "replace":
        os.replace = os.rename = lambda *args, **kwargs: _kill_now()


def _log_start(job, start, extra=""):
    with open(Path(job["out"]) / "starts.log", "a") as f:
        f.write(f"{job['attempt']} {start} {extra}\n")


def _to_plain(x):
    """DTensors to full tensors, so the parent loads the result with weights_only=True."""
    if hasattr(x, "full_tensor"):
        return x.full_tensor()
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_plain(v) for v in x)
    return x


def _write_final(job, model, opt, sched):
    checkpoint_io.save(_to_plain({"model": model.state_dict(), "opt": opt.state_dict(),
                                  "sched": sched.state_dict(), "rng": torch.get_rng_state()}),
                       Path(job["out"]) / "final.pt")


def _run_plain(job):
    """A plain loop: one checkpoint file, overwritten every EVERY steps."""
    path = Path(job["out"]) / "ckpt.pt"
    resumed = path.exists()
    model_seed, generator_seed = _seeds(job, resumed)
    torch.manual_seed(model_seed)
    model = _mlp()
    opt = _optimizer(model, job, generator_seed)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=STEPS)
    start = 0
    if resumed:
        ckpt = checkpoint_io.load(path)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        torch.set_rng_state(ckpt["rng"])
        start = ckpt["step"]
    _log_start(job, start)
    save = checkpoint_io.save if job["saver"] == "atomic" else torch.save
    data = _data()
    for t in range(start + 1, STEPS + 1):
        _train_step(model, opt, sched, data, t)
        _after_step(job, t)
        if t % EVERY == 0:
            _before_save(job, t)
            save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                  "rng": torch.get_rng_state(), "step": t}, path)
    _write_final(job, model, opt, sched)


class _HFClassifier(nn.Module):
    """The MLP with the Trainer's calling convention (``loss`` from ``labels``)."""

    def __init__(self):
        super().__init__()
        self.net = _mlp()

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"loss": None if labels is None else F.cross_entropy(logits, labels), "logits": logits}


def _last_complete_trainer_checkpoint(out: Path) -> Path | None:
    """The newest ``checkpoint-N`` whose ``trainer_state.json`` (the Trainer writes it last) is
    complete. ``transformers.trainer_utils.get_last_checkpoint`` returns the newest directory,
    complete or not."""
    complete = []
    for d in out.glob("checkpoint-*"):
        try:
            state = json.loads((d / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        if state.get("global_step") == int(d.name.split("-")[1]):
            complete.append((state["global_step"], d))
    return max(complete)[1] if complete else None


def _run_trainer(job):
    """Trainer: a checkpoint directory every EVERY steps, resumed with resume_from_checkpoint."""
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    out = Path(job["out"])
    last = _last_complete_trainer_checkpoint(out) if out.exists() else None
    model_seed, generator_seed = _seeds(job, last is not None)
    torch.manual_seed(model_seed)
    model = _HFClassifier()
    opt = _optimizer(model, job, generator_seed)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / (2 * STEPS))

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):   # before the step's checkpoint
            _after_step(job, state.global_step)
            if control.should_save:
                _before_save(job, state.global_step)

    args = TrainingArguments(str(out), max_steps=STEPS, per_device_train_batch_size=BATCH, save_strategy="steps",
                             save_steps=EVERY, report_to=[], use_cpu=True, logging_strategy="no", disable_tqdm=True,
                             max_grad_norm=0.0, dataloader_num_workers=0, seed=0)
    x, y = _data()
    trainer = Trainer(model, args, train_dataset=[{"x": x[i], "labels": int(y[i])} for i in range(N_DATA)],
                      optimizers=(opt, sched), callbacks=[Kill()])
    newest = get_last_checkpoint(str(out)) if out.exists() else None
    _log_start(job, int(last.name.split("-")[1]) if last else 0,
               Path(newest).name.split("-")[1] if newest else "-")
    trainer.train(resume_from_checkpoint=str(last) if last else None)
    _write_final(job, model, opt, sched)


def _last_complete_dcp_checkpoint(out: Path) -> tuple[int, Path] | None:
    """The newest DCP checkpoint directory with its ``.metadata`` (dcp.save renames it into place
    after every shard is written)."""
    done = [(int(d.name.split("-")[1]), d) for d in (out / "dcp").glob("step-*") if (d / ".metadata").exists()]
    return max(done) if done else None


def _run_dcp(job):
    """FSDP2 (fully_shard on one gloo rank) with get_state_dict / dcp.save / dcp.load / set_state_dict,
    one checkpoint directory every EVERY steps."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    out = Path(job["out"])
    dist.init_process_group("gloo", init_method=(out / f"store-{job['attempt']}").as_uri(), rank=0, world_size=1)
    last = _last_complete_dcp_checkpoint(out)
    model_seed, generator_seed = _seeds(job, last is not None)
    torch.manual_seed(model_seed)
    model = _mlp()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = _optimizer(model, job, generator_seed)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=STEPS)

    def state(step):
        model_sd, optim_sd = get_state_dict(model, opt)
        return {"model": model_sd, "optim": optim_sd, "sched": sched.state_dict(), "rng": torch.get_rng_state(),
                "step": step}

    start = 0
    if last is not None:
        loaded = state(0)
        dcp.load(loaded, checkpoint_id=str(last[1]))
        set_state_dict(model, opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
        sched.load_state_dict(loaded["sched"])
        torch.set_rng_state(loaded["rng"])
        start = loaded["step"]
        assert start == last[0], (start, last)
    _log_start(job, start)
    data = _data()
    for t in range(start + 1, STEPS + 1):
        _train_step(model, opt, sched, data, t)
        _after_step(job, t)
        if t % EVERY == 0:
            sd = state(t)
            _before_save(job, t)
            dcp.save(sd, checkpoint_id=str(out / "dcp" / f"step-{t}"))
    _write_final(job, model, opt, sched)
    dist.destroy_process_group()


RUNNERS = {"plain": _run_plain, "trainer": _run_trainer, "dcp": _run_dcp}
REFERENCE_FILES = {  # (reference run's directory, step) -> the files of that step's checkpoint
    "plain": lambda ref, t: [ref / "ckpt.pt"],
    "trainer": lambda ref, t: [f for f in (ref / f"checkpoint-{t}").iterdir() if f.is_file()],
    "dcp": lambda ref, t: [f for f in (ref / "dcp" / f"step-{t}").iterdir() if f.is_file()],
}
JOB_TIMEOUT = 60


def _serve() -> None:
    """The zygote, in its own process: imports once, then for each jobs file named on stdin forks
    one process per job, in order, and records how each ended (its exit code, or minus the signal
    that killed it) and, for a ``save`` kill, which files the kernel cut at the planned byte."""
    torch.set_num_threads(1)          # no thread pool exists when forking; the same math in every job
    # imported here, once, not in every attempt (Optimizer() imports torch._dynamo lazily: 1.5 s)
    for module in ("torch._dynamo", "transformers.trainer", "torch.distributed.checkpoint.state_dict",
                   "torch.distributed.fsdp"):
        try:
            importlib.import_module(module)
        except ImportError:
            pass
    for line in sys.stdin:
        jobs_file = line.strip()
        try:
            results = [_run_job(job) for job in json.loads(Path(jobs_file).read_text())]
        except Exception:             # the zygote's own failure: reported, and the next test still runs
            import traceback
            traceback.print_exc()
            results = None
        Path(jobs_file + ".results").write_text(json.dumps(results))
        print("done", flush=True)


def _run_job(job) -> dict:
    sys.stderr.flush()
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.dup2(2, 1)             # stdout is the zygote's reply channel; stderr is a pipe (no RLIMIT_FSIZE)
            signal.signal(signal.SIGXFSZ, signal.SIG_DFL)   # Python ignores it; the kernel's default kills
            RUNNERS[job["stack"]](job)
            code = 0
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.perf_counter() - started > JOB_TIMEOUT:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return {"code": "timeout", "cut": []}
        time.sleep(0.01)
    code = os.waitstatus_to_exitcode(done[1])
    cut = []
    if job["kill"] and job["kill"]["kind"] == "save" and code == -SIGXFSZ:
        limit = _cut_at(job)
        cut = sorted(str(f.relative_to(job["out"])) for f in Path(job["out"]).rglob("*")
                     if f.is_file() and f.stat().st_size == limit)
    print(f"job {job['stack']} {job['prior_mean']} attempt {job['attempt']} kill {job['kill']}: exit code {code}, "
          f"cut {cut}, {time.perf_counter() - started:.2f} s", file=sys.stderr, flush=True)
    return {"code": code, "cut": cut}


class _Zygote:
    def __init__(self):
        code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_fault_injection as t; t._serve()"
        env = {**os.environ, "TORCH_PROXVI_COMPILE": "0", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.stderr: list[str] = []
        self.since = 0
        # drained by a thread: the jobs' tracebacks and the timing lines, shown when a check fails
        self.reader = threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True)
        self.reader.start()

    def run(self, tmp_path: Path, jobs: list[dict]) -> list[dict]:
        jobs_file = tmp_path / "jobs.json"
        jobs_file.write_text(json.dumps(jobs))
        assert self.proc.poll() is None, f"the zygote exited ({self.proc.returncode})\n{self.log()}"
        self.since = len(self.stderr)
        self.proc.stdin.write(f"{jobs_file}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "done", self.log()
        results = json.loads(Path(f"{jobs_file}.results").read_text())
        assert results is not None, self.log()
        return results

    def log(self) -> str:
        """What the zygote and the jobs of the last run wrote to stderr (its end)."""
        return "".join(self.stderr[self.since:])[-6000:]

    def close(self):
        self.proc.stdin.close()
        self.proc.kill()              # it is idle; no need to wait for torch's interpreter shutdown
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote():
    z = _Zygote()
    yield z
    z.close()


# ---------------------------------------------------------------------------- the parent: plan, run, compare
def _plan(seed: int, kinds: list[str]) -> list[dict]:
    """Kill points drawn from ``seed``, in the order training meets them."""
    rng = random.Random(seed)
    kills = []
    for kind in kinds:
        # a save or rename interrupted while an older checkpoint exists: the case atomicity is for
        at = rng.choice(SAVES[1:]) if kind in ("save", "replace") else rng.randint(1, STEPS)
        kills.append({"kind": kind, "at": at, "frac": round(rng.uniform(0.0, 0.95), 3)})
    phase = {"step": 0, "save": 1, "replace": 2}
    return sorted(kills, key=lambda k: (k["at"], phase[k["kind"]]))


def _chain(zygote, tmp_path: Path, stack: str, prior_mean: str, kills: list[dict]):
    """An uninterrupted reference run, then the killed run: one attempt per kill and a last one that
    finishes. Checks how every attempt ended, that a ``save`` kill cut a file of the checkpoint at
    the planned byte, and where each attempt resumed; returns both final states."""
    ref, run = tmp_path / "ref", tmp_path / "killed"
    ref.mkdir()
    run.mkdir()
    base = {"stack": stack, "prior_mean": prior_mean, "saver": "atomic", "ref": str(ref)}
    jobs = [{**base, "out": str(ref), "attempt": 0, "kill": None}]
    jobs += [{**base, "out": str(run), "attempt": i, "kill": kill} for i, kill in enumerate([*kills, None], 1)]
    results = zygote.run(tmp_path, jobs)
    codes = [r["code"] for r in results]
    expected = [0] + [-SIGNAL_OF[k["kind"]] for k in kills] + [0]
    assert codes == expected, f"exit codes {codes}, expected {expected} for kills {kills}\n{zygote.log()}"
    for kill, result in zip(kills, results[1:]):
        assert (kill["kind"] == "save") == bool(result["cut"]), (kill, result, zygote.log())
    # the last complete checkpoint before each kill: the newest save strictly before the kill's step
    starts = [0] + [max([s for s in SAVES if s < k["at"]], default=0) for k in kills]
    logged = [line.split() for line in (run / "starts.log").read_text().splitlines()]
    assert [int(line[1]) for line in logged] == starts, (logged, kills)
    final = torch.load(run / "final.pt", weights_only=True)
    reference = torch.load(ref / "final.pt", weights_only=True)
    return final, reference, logged


def _assert_same_run(final, reference):
    assert_nested_equal(final["opt"], reference["opt"], "optimizer")   # posterior, prior mean, RNG, step
    assert_nested_equal(final["model"], reference["model"], "model")
    assert_nested_equal(final["sched"], reference["sched"], "scheduler")
    assert torch.equal(final["rng"], reference["rng"])


PLANS = {  # (stack, prior_mean) -> the seed of its kill points
    ("plain", "zero"): 11, ("plain", "init"): 12,
    ("trainer", "zero"): 21, ("trainer", "init"): 22,
    ("dcp", "zero"): 31, ("dcp", "init"): 32,
}


@posix_only
@pytest.mark.parametrize("prior_mean", ["zero", "init"])
def test_plain_loop_killed_anywhere_resumes_bit_identically(zygote, tmp_path, prior_mean):
    kills = _plan(PLANS["plain", prior_mean], ["step", "save", "replace", "save"])
    final, reference, _ = _chain(zygote, tmp_path, "plain", prior_mean, kills)
    _assert_same_run(final, reference)
    # the interrupted writes left their temporary files beside the checkpoint, never in its place
    assert len(list((tmp_path / "killed").glob(".ckpt.pt.*.tmp"))) == sum(k["kind"] != "step" for k in kills)


@posix_only
@pytest.mark.parametrize("prior_mean", ["zero", "init"])
def test_trainer_killed_anywhere_resumes_bit_identically(zygote, tmp_path, prior_mean):
    pytest.importorskip("transformers", reason="transformers is missing (the dev extra has it)")
    kills = _plan(PLANS["trainer", prior_mean], ["step", "save", "save"])
    final, reference, logged = _chain(zygote, tmp_path, "trainer", prior_mean, kills)
    _assert_same_run(final, reference)
    # after a kill mid-save the newest directory is incomplete: transformers' get_last_checkpoint
    # (what resume_from_checkpoint=True uses) picks it, and the restarted job fails on it
    for kill, (_, start, newest) in zip(kills, logged[1:]):
        if kill["kind"] == "save":
            assert int(newest) == kill["at"] > int(start), (kill, start, newest)


@posix_only
@pytest.mark.parametrize("prior_mean", ["zero", "init"])
def test_dcp_killed_anywhere_resumes_bit_identically(zygote, tmp_path, prior_mean):
    torch_dist = pytest.importorskip("torch.distributed")
    if not torch_dist.is_available():
        pytest.skip("torch.distributed is not built into this torch")
    kills = _plan(PLANS["dcp", prior_mean], ["step", "save", "replace"])
    final, reference, _ = _chain(zygote, tmp_path, "dcp", prior_mean, kills)
    _assert_same_run(final, reference)


@posix_only
def test_torch_save_killed_mid_write_destroys_the_last_checkpoint_and_atomic_save_does_not(zygote, tmp_path):
    """Why the helper matters: the same kill, in the middle of overwriting the step-3 checkpoint with
    step 6's, leaves a torn file with ``torch.save`` and the intact step-3 checkpoint with
    ``checkpoint_io.save``."""
    kill = {"kind": "save", "at": 6, "frac": 0.5}
    base = {"stack": "plain", "prior_mean": "zero", "ref": str(tmp_path / "torch")}
    jobs = [{**base, "saver": "torch", "out": str(tmp_path / "torch"), "attempt": 0, "kill": None},
            {**base, "saver": "torch", "out": str(tmp_path / "killed"), "attempt": 0, "kill": kill},
            {**base, "saver": "atomic", "out": str(tmp_path / "killed_atomic"), "attempt": 0, "kill": kill}]
    for job in jobs:
        Path(job["out"]).mkdir()
    results = zygote.run(tmp_path, jobs)
    assert [r["code"] for r in results] == [0, -SIGXFSZ, -SIGXFSZ], zygote.log()
    assert results[1]["cut"] == ["ckpt.pt"]                           # torch.save cut the checkpoint itself
    assert [Path(c).name.startswith(".ckpt.pt.") for c in results[2]["cut"]] == [True]   # the helper: its temp file

    torn = tmp_path / "killed" / "ckpt.pt"
    size = os.path.getsize(tmp_path / "torch" / "ckpt.pt")
    assert 0 < os.path.getsize(torn) <= size // 2 + 1    # cut by the kernel at half the file
    with pytest.raises((RuntimeError, OSError, EOFError)):   # which one depends on the cut
        torch.load(torn, weights_only=True)
    with pytest.raises(checkpoint_io.CorruptCheckpointError, match=f"{re.escape(str(torn))}.*truncated or corrupt"):
        checkpoint_io.load(torn)

    intact = tmp_path / "killed_atomic" / "ckpt.pt"
    assert checkpoint_io.load(intact)["step"] == 3        # the previous checkpoint, untouched
    assert [p.name.endswith(".tmp") for p in (tmp_path / "killed_atomic").glob(".ckpt.pt.*")] == [True]


# ---------------------------------------------------------------------------- the helper, in process
def test_save_and_load_round_trip_an_optimizer_exactly(tmp_path):
    torch.manual_seed(0)
    model = _mlp()
    opt = ProxScoreOptimizer(model.parameters(), lr=1e-2, dataset_size=N_DATA, prior_mean="init")
    x, y = _data()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    checkpoint_io.save({"opt": opt.state_dict()}, tmp_path / "c.pt")
    assert_nested_equal(checkpoint_io.load(tmp_path / "c.pt", verify=True)["opt"], opt.state_dict())
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_save_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint_io.save({"step": 1}, path)
    os.chmod(path, 0o600)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):   # a lambda does not pickle
        checkpoint_io.save({"step": 2, "bad": lambda: 0}, path)
    assert checkpoint_io.load(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    checkpoint_io.save({"step": 3}, path)
    assert checkpoint_io.load(path) == {"step": 3}
    assert os.stat(path).st_mode & 0o777 == 0o600         # the replaced file's permissions are kept
    with open(tmp_path / "f", "wb") as f, pytest.raises(TypeError, match="file path"):
        checkpoint_io.save({}, f)


def test_load_names_a_truncated_or_damaged_file(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint_io.save({"w": torch.arange(1000.0)}, path)
    data = path.read_bytes()
    for cut in (0, 10, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(checkpoint_io.CorruptCheckpointError, match=f"{re.escape(str(path))}.*{cut} bytes"):
            checkpoint_io.load(path)
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0xFF                        # inside the tensor's bytes: torch.load does not notice
    path.write_bytes(bytes(damaged))
    assert not torch.equal(checkpoint_io.load(path)["w"], torch.arange(1000.0))
    with pytest.raises(checkpoint_io.CorruptCheckpointError, match="CRC"):
        checkpoint_io.load(path, verify=True)
    with pytest.raises(FileNotFoundError):
        checkpoint_io.load(tmp_path / "missing.pt")
