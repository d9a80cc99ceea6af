"""The optimizer on a CUDA device: the same update as on the CPU, the compiled (Triton) kernel
(:func:`torch_proxvi.kernels.dispatch.compiled_kernel`) against its eager body
(:func:`~torch_proxvi.kernels.dispatch.kernel_body`) and against the CPU's, the flat path on CUDA
against the CPU's single-tensor path, step temporaries bounded by the accelerator's chunk, mixed
precision with GradScaler, exact resume.

Skipped where no CUDA device is present (CI has none); ``benchmarks/gpu_check.py`` runs this
file first on a GPU machine.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from torch_proxvi import ProxScoreOptimizer
from torch_proxvi.kernels import dispatch, layout

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

F64 = torch.float64
CUDA = torch.device("cuda")


def twin_params(shapes=((16, 8), (8,), (3, 5, 7)), dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    values = [torch.randn(s, generator=g, dtype=F64).to(dtype) for s in shapes]
    cpu = [torch.nn.Parameter(v.clone()) for v in values]
    gpu = [torch.nn.Parameter(v.clone().to(CUDA)) for v in values]
    return cpu, gpu


def set_grads(cpu, gpu, seed):
    g = torch.Generator().manual_seed(seed)
    for a, b in zip(cpu, gpu):
        grad = torch.randn(a.shape, generator=g, dtype=F64).to(a.dtype) * 0.3 + 0.1 * a.detach()
        a.grad = grad
        b.grad = grad.to(CUDA)


def steps_agree(cpu, gpu, opts, steps):
    """Step the CPU and the CUDA optimizer (``opts``) in lockstep and check their states agree in
    float64. The two devices draw different noise, so before each step the CPU copy is given the
    CUDA sample; from there the update (score, both Adam steps) must agree to rounding."""
    for step in range(steps):
        with torch.no_grad():
            for a, b in zip(cpu, gpu):
                a.copy_(b.cpu())
        set_grads(cpu, gpu, seed=step)
        for opt in opts:
            opt.step()
        for a, b in zip(cpu, gpu):
            for k, v in opts[0].state[a].items():
                assert opts[1].state[b][k].device.type == "cuda" or v.dim() == 0
                torch.testing.assert_close(opts[1].state[b][k].cpu(), v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("kw", [dict(), dict(mean_update="residual", betas=(0.0, 0.99), prior_mean="init",
                                              warmup_steps=1)])
def test_the_cuda_update_equals_the_cpu_update_in_float64(foreach, kw):
    cpu, gpu = twin_params()
    opts = [ProxScoreOptimizer(ps, lr=0.05, dataset_size=40, init_std=0.2, foreach=foreach, **kw)
            for ps in (cpu, gpu)]
    steps_agree(cpu, gpu, opts, steps=4)
    for b in gpu:                           # and a fresh sample was written on the device
        assert not torch.equal(b.detach(), opts[1].state[b]["mean"])


@pytest.mark.parametrize("kw", [dict(), dict(mean_update="residual", betas=(0.0, 0.99), prior_mean="init")])
def test_compiled_triton_kernel_matches_eager_and_the_cpu_kernel(kw, monkeypatch):
    # compiled=True draws its noise from a counter-based hash of (seed, index), the same stream on
    # every device: Triton on CUDA, the kernel's eager body (dispatch.kernel_body) on CUDA and on
    # the CPU must all give the same weights and state (one CPU generator supplies every run's
    # per-step seeds).
    if not dispatch.compiler_available("cuda"):
        pytest.skip("no Triton here: torch.compile cannot build the CUDA kernel")

    def run(params, eager):
        g = torch.Generator().manual_seed(1)
        with monkeypatch.context() as m:
            if eager:   # the compiled path with its kernel body run eagerly (no build, no compiler needed)
                m.setattr(dispatch, "compiled_kernel", lambda: dispatch.kernel_body)
                m.setattr(dispatch, "compiler_available", lambda device_type: True)
            opt = ProxScoreOptimizer(params, lr=0.05, dataset_size=40, init_std=0.2, compiled=True, **kw)
            assert opt._path(opt.param_groups[0]) == "compiled"
            seeds = torch.Generator().manual_seed(5)
            opt._generator = lambda device: seeds
            for _ in range(3):
                for p in params:
                    p.grad = (torch.randn(p.shape, generator=g, dtype=F64) * 0.3).to(p.device)
                opt.step()
        return opt

    # (200, 100) is called on its own on the CPU and packed with the rest on CUDA: the noise is
    # indexed by canonical offset, so the packing does not change it
    shapes = ((16, 8), (8,), (200, 100), (3, 5, 7))
    cpu, gpu = twin_params(shapes)
    _, gpu_eager = twin_params(shapes)
    ref, eager, compiled = run(cpu, eager=True), run(gpu_eager, eager=True), run(gpu, eager=False)
    # a kernel that failed to build falls back to its eager body (with a notice): then this test
    # would compare the eager body with itself
    assert "cuda" not in dispatch._failed, "the Triton kernel failed to build and ran eagerly"
    for a, b, c in zip(cpu, gpu_eager, gpu):
        torch.testing.assert_close(c.detach(), b.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(c.detach().cpu(), a.detach(), rtol=1e-10, atol=1e-10)
        assert not torch.equal(c.detach(), compiled.state[c]["mean"])     # a sample, not the mean
        for k in ("mean", "log_scale", "mean_exp_avg_sq", "log_scale_exp_avg_sq"):
            torch.testing.assert_close(compiled.state[c][k], eager.state[b][k], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(compiled.state[c][k].cpu(), ref.state[a][k], rtol=1e-10, atol=1e-10)


def test_bf16_weights_on_cuda_keep_float32_state_that_moves():
    _, gpu = twin_params(dtype=torch.bfloat16)
    opt = ProxScoreOptimizer(gpu, lr=0.01, dataset_size=40)
    for step in range(3):
        for p in gpu:
            p.grad = torch.randn_like(p)
        opt.step()
        if step == 0:
            first = {p: opt.state[p]["mean"].clone() for p in gpu}
    for p in gpu:
        assert p.dtype == torch.bfloat16 and opt.state[p]["mean"].dtype == torch.float32
        assert (opt.state[p]["mean"] - first[p]).abs().max() > 1e-4


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3)).to(CUDA)


def test_fp16_grad_scaler_on_cuda_skips_an_overflow_and_trains():
    x = torch.randn(64, 10, device=CUDA)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    model = mlp()
    opt = ProxScoreOptimizer(model.parameters(), lr=1e-2, dataset_size=64)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    losses = []
    for step in range(60):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        if step == 5:
            means = {p: opt.state[p]["mean"].clone() for p in model.parameters()}
            scale = scaler.get_scale()
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if step == 5:
            assert scaler.get_scale() < scale
            assert all(torch.equal(means[p], opt.state[p]["mean"]) for p in model.parameters())
        else:
            losses.append(float(loss.detach()))
    assert sum(losses[-10:]) < 0.7 * sum(losses[:10])


@pytest.mark.parametrize("compiled", [False, True])
def test_a_cuda_checkpoint_resumes_bit_identically(compiled):
    x = torch.randn(32, 10, device=CUDA)
    y = torch.randint(0, 3, (32,), device=CUDA)

    def train(model, opt, n):
        for _ in range(n):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    model = mlp()
    opt = ProxScoreOptimizer(model.parameters(), lr=1e-2, dataset_size=32, compiled=compiled)
    train(model, opt, 2)
    buf = io.BytesIO()
    torch.save({"m": model.state_dict(), "o": opt.state_dict()}, buf)
    train(model, opt, 3)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2 = mlp()
    opt2 = ProxScoreOptimizer(model2.parameters(), lr=1e-2, dataset_size=32, compiled=compiled)
    model2.load_state_dict(saved["m"])
    opt2.load_state_dict(saved["o"])
    train(model2, opt2, 3)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["log_scale"], opt2.state[b]["log_scale"])


def test_predictive_on_cuda_is_repeatable_and_leaves_the_sample():
    model = mlp()
    opt = ProxScoreOptimizer(model.parameters(), lr=1e-2, dataset_size=32, init_std=0.1)
    x = torch.randn(8, 10, device=CUDA)
    F.cross_entropy(model(x), torch.zeros(8, dtype=torch.long, device=CUDA)).backward()
    opt.step()
    weights = [p.detach().clone() for p in model.parameters()]
    draws = [opt.predictive(model, x, n_samples=4, generator=torch.Generator(device=CUDA).manual_seed(3))
             for _ in range(2)]
    assert draws[0].device.type == "cuda" and torch.equal(draws[0], draws[1])
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters()))


def peak_of_a_step(n_tensors, path):
    """The allocator's peak during a step of ``n_tensors`` 4M-number float32 tensors, beyond what
    was allocated before it (the state is made, and the packed state laid out, by a first step)."""
    params = [torch.nn.Parameter(torch.randn(4_000_000, device=CUDA)) for _ in range(n_tensors)]
    opt = ProxScoreOptimizer(params, lr=1e-3, dataset_size=100, compiled=path == "compiled")
    assert opt._path(opt.param_groups[0]) == path
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    opt.step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del params, opt
    torch.cuda.empty_cache()
    return peak


@pytest.mark.parametrize("path", ["flat", "compiled"])
def test_step_temporaries_on_cuda_are_bounded_by_the_chunk_not_the_model(path):
    # 64M and 128M weights in 4M tensors: on CUDA every tensor is packed into calls of up to
    # ACCELERATOR_CHUNK_NUMEL numbers, so the step's peak allocation is a few chunk-sized
    # temporaries, the same for twice the model (the single-tensor path holds four statistics
    # per weight, four times the model)
    if path == "compiled" and not dispatch.compiler_available("cuda"):
        pytest.skip("no Triton here: torch.compile cannot build the CUDA kernel")
    chunk_bytes = layout.ACCELERATOR_CHUNK_NUMEL * 4
    peak, peak_twice = peak_of_a_step(16, path), peak_of_a_step(32, path)
    assert peak_twice <= peak * 1.05 + 2**22, (peak, peak_twice)
    if path == "flat":
        # the eager functions: the packed weights and gradients, the score's four statistics, the
        # Adam temporaries and the sample (13 chunks, measured with PeakTemporaries on the CPU
        # with the accelerator's layout)
        assert peak <= 16 * chunk_bytes, (peak, chunk_bytes)
    else:
        # one Triton kernel: little beyond the packed weights and gradients
        assert "cuda" not in dispatch._failed, "the Triton kernel failed to build and ran eagerly"
        assert peak <= 6 * chunk_bytes, (peak, chunk_bytes)


@pytest.mark.parametrize("chunk", [None, 5000], ids=["one-call", "pieces"])
@pytest.mark.parametrize("first_moments", [True, False])
def test_the_cuda_flat_path_gives_the_cpu_single_path_update(first_moments, chunk, monkeypatch):
    # The flat path on CUDA packs every tensor into flat buffers (with chunk=5000 the (200, 100)
    # tensor is stepped in pieces instead); the CPU's single path steps each tensor as it is. For
    # the same gradients the state must agree to rounding in float64 after every step (the noise
    # is excluded: steps_agree gives the CPU copy the CUDA sample before each step).
    if chunk is not None:
        monkeypatch.setattr(layout, "ACCELERATOR_CHUNK_NUMEL", chunk)
    cpu, gpu = twin_params(((16, 8), (8,), (200, 100), (3, 5, 7)))
    kw = dict(lr=0.05, dataset_size=40, init_std=0.2, betas=(0.9 if first_moments else 0.0, 0.999))
    opts = [ProxScoreOptimizer(cpu, foreach=False, **kw), ProxScoreOptimizer(gpu, compiled=False, **kw)]
    assert [o._path(o.param_groups[0]) for o in opts] == ["single", "flat"]
    steps_agree(cpu, gpu, opts, steps=3)
    assert all(("mean_exp_avg" in opts[1].state[b]) == first_moments for b in gpu)
    for b in gpu:                           # and a fresh sample was written on the device
        assert not torch.equal(b.detach(), opts[1].state[b]["mean"])
