"""Where the compiled step's time goes on the CPU: one 10M tensor, the kernel taken apart.

    python benchmarks/kernel_floor.py                  # 10M, about 30 s on 2 CPU cores
    python benchmarks/kernel_floor.py --size 50

Every row is one compiled function (``torch.compile``, the options of ``compiled=True``) on one
flat float32 tensor of the size of ``step_overhead.py``'s ViT-shaped parameter set, or an
optimizer step on that set, timed interleaved in one process, the median of ``--steps`` after 3
warm-up calls. glibc is told to reuse freed memory first (``step_overhead.reuse_freed_memory``),
so Adam(foreach) runs at its fastest and no row pays for fresh pages. The rows:

* the whole kernel (:func:`torch_proxvi.kernels.dispatch.compiled_kernel`: its eager body
  :func:`~torch_proxvi.kernels.dispatch.kernel_body` compiled, as ``compiled=True`` runs it), with
  and without first moments;
* the kernel with the noise replaced by a constant: the update's arithmetic and memory traffic;
* the noise alone (:func:`torch_proxvi.kernels.noise.hash_normal` written to memory), and its parts;
* memory traffic alone: functions that read 8 arrays and write 7 (the kernel's), or read 6 and
  write 5 (without first moments), with trivial arithmetic: the floor for that many streams;
* Adam(foreach) and fused AdamW on the ViT-shaped set (the kernel's time is the same for one
  tensor as for the set's 52 matrices).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent))
from step_overhead import SHAPES, reuse_freed_memory, vit_shaped  # noqa: E402

from torch_proxvi.kernels import StepHyper, dispatch, noise  # noqa: E402

OPTIONS = {"cpp.dynamic_threads": True}   # those of dispatch.compiled_kernel


def compile_(fn):
    return torch.compile(fn, dynamic=True, options=OPTIONS)


def noise_hash_only(out, key):
    out.copy_(noise.uniforms(noise.hash_bits(key, out.numel(), out.device), out.dtype)[0])


def noise_radius(out, key):          # hash, log, sqrt
    u1, _ = noise.uniforms(noise.hash_bits(key, out.numel(), out.device), out.dtype)
    out.copy_(torch.sqrt(-2 * torch.log(u1)))


def noise_angle(out, key):           # hash, cos
    _, u2 = noise.uniforms(noise.hash_bits(key, out.numel(), out.device), out.dtype)
    out.copy_(torch.cos(6.283185307179586 * u2))


def noise_whole(out, key):
    out.copy_(noise.hash_normal(key, out.numel(), out.dtype, out.device))


def kernel_without_noise(p, grad, state, numbers, static):
    """:func:`dispatch.kernel_body` (the same update) with a constant for the noise."""
    h = StepHyper.from_numbers(numbers, static)
    rule = dispatch.RULES[h.rule]
    dispatch.update_from_sample(rule, p, grad, state, h)
    p.copy_(rule.sample(state, 0.5))


def streams_15(a, b, c, d, e, f, g, h):
    total = a + b + c + d + e + f + g + h
    for i, out in enumerate((b, c, d, e, f, g, h)):
        out.copy_(total * (i + 2))


def streams_11(a, b, c, d, e, f):
    total = a + b + c + d + e + f
    for i, out in enumerate((b, c, d, e, f)):
        out.copy_(total * (i + 2))


def rows(size: int):
    shaped = [torch.nn.Parameter(t) for t in vit_shaped(size, torch.device("cpu"))]
    numel = sum(p.numel() for p in shaped)
    gen = torch.Generator().manual_seed(0)
    arrays = [torch.randn(numel, generator=gen) * 0.01 for _ in range(8)]
    p, grad, mean, log_scale, m1, v1, m2, v2 = arrays
    log_scale.fill_(-7.0)
    for t in (m1, v1, m2, v2):
        t.zero_()
    # the proximal rule, score update, no prior mean; Adam step 10 (1 / sqrt(1 - 0.999^10) ~ 10)
    h = StepHyper(lr=1e-3, scale_lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, score_scale=-5e4,
                  prior_precision=1.0, prox_weight=1.0, step=9.0)
    numbers, static = h.numbers(torch.float32, "cpu"), h.static()
    numbers_no_momentum = h._replace(beta1=0.0).numbers(torch.float32, "cpu")
    state = {"mean": mean, "log_scale": log_scale, "mean_exp_avg": m1, "mean_exp_avg_sq": v1,
             "log_scale_exp_avg": m2, "log_scale_exp_avg_sq": v2}
    state_no_momentum = {k: v for k, v in state.items() if not k.endswith("_exp_avg")}
    key = torch.tensor(12345, dtype=torch.int64)
    kernel = dispatch.compiled_kernel()
    without_noise = compile_(kernel_without_noise)
    noise_fns = {name: compile_(fn) for name, fn in (("hash", noise_hash_only), ("radius", noise_radius),
                                                     ("angle", noise_angle), ("whole", noise_whole))}
    s15, s11 = compile_(streams_15), compile_(streams_11)
    out = torch.empty(numel)
    adam_params, fused_params = shaped, [torch.nn.Parameter(p.detach().clone()) for p in shaped]
    for ps in (adam_params, fused_params):
        for q in ps:
            q.grad = torch.randn(q.shape, generator=gen) * 0.01
    adam = torch.optim.Adam(adam_params, lr=1e-3, foreach=True)
    fused = torch.optim.AdamW(fused_params, lr=1e-3, fused=True)
    return numel, {
        "Adam (foreach)": adam.step,
        "AdamW (fused)": fused.step,
        "kernel": lambda: kernel(p, grad, state, key, numbers, static),
        "kernel, betas=(0, 0.999)": lambda: kernel(p, grad, state_no_momentum, key, numbers_no_momentum, static),
        "kernel without the noise": lambda: without_noise(p, grad, state, numbers, static),
        "noise alone": lambda: noise_fns["whole"](out, key),
        "  hash only": lambda: noise_fns["hash"](out, key),
        "  hash, log, sqrt": lambda: noise_fns["radius"](out, key),
        "  hash, cos": lambda: noise_fns["angle"](out, key),
        "memory: 8 reads, 7 writes": lambda: s15(*arrays),
        "memory: 6 reads, 5 writes": lambda: s11(*arrays[:6]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=10, choices=sorted(SHAPES), help="millions, as step_overhead.py")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    reuse_freed_memory()
    numel, calls = rows(args.size)
    for call in calls.values():
        for _ in range(3):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.steps):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    adam = statistics.median(times["Adam (foreach)"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {numel / 1e6:.1f}M numbers")
    print("| what | ms | ratio to Adam (foreach) |\n|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med * 1e3:.1f} | {med / adam:.2f} |")


if __name__ == "__main__":
    main()
