"""The optimizer step's cost against Adam: time, persistent state and peak temporaries.

    python benchmarks/step_overhead.py                      # 1M, 10M, 50M parameters on CPU
    python benchmarks/step_overhead.py --sizes 10 --steps 30
    python benchmarks/step_overhead.py --device cuda --sizes 86 304   # ViT-B / ViT-L sizes

Parameter sets are shaped like a ViT (per block: qkv, proj, fc1, fc2 matrices with biases and two
LayerNorms; width and depth chosen for the size). Every optimizer gets its own copy of the
parameters, all sharing one fixed random gradient, and ``step()`` is timed interleaved (one step
of each optimizer in turn, the median of ``--steps`` after 3 warm-up steps), so the machine's
load affects all alike. IVON's step is timed with its ``sampled_params`` context (where it draws
its sample and collects the gradient), because that is where its per-step work happens.

Columns: the median step time as a ratio to Adam(foreach=True); persistent optimizer state in
bytes per parameter (Adam: 8); and the peak of the temporaries allocated during the step, in
bytes per parameter (CPU: tracked by a dispatch mode; CUDA: the allocator's peak); on the CPU
also the page faults per step. The last table times a whole training step (forward, backward,
step) of a small ViT.

**Adam(foreach)'s two speeds on the CPU.** Its step allocates full-size temporaries. glibc
serves them either from memory freed the step before or from fresh pages, which the kernel must
fault in and zero (about 9000 faults per step at 10M, and twice the time), depending on the
heap's history in the process. So one run may find Adam at 20 ms and the next at 40.
``--reuse-freed-memory`` tells glibc to keep and reuse freed memory (``mallopt``), which holds
every optimizer at its fastest: the strict comparison.
"""

from __future__ import annotations

import argparse
import ctypes
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent))
from torch_proxvi import ADVI, ProxScoreOptimizer  # noqa: E402
from torch_proxvi.reference.testing import PeakTemporaries, tensors_in  # noqa: E402

SHAPES = {1: (128, 5), 10: (256, 13), 50: (512, 16), 86: (768, 12), 304: (1024, 24)}  # width, depth


def vit_shaped(millions: int, device, dtype=torch.float32) -> list[torch.Tensor]:
    """Tensors shaped like a ViT's parameters (about ``millions`` x 1e6 numbers)."""
    d, depth = SHAPES[millions]
    shapes = []
    for _ in range(depth):
        shapes += [(3 * d, d), (3 * d,), (d, d), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,),
                   (d,), (d,), (d,), (d,)]
    return [torch.zeros(s, device=device, dtype=dtype) for s in shapes]


def optimizers(device) -> dict:
    out = {
        "Adam (foreach)": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True),
        "AdamW (fused)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        "ADVI": lambda ps: ADVI(ps, lr=1e-3, dataset_size=50_000),
        "ProxScore": lambda ps: ProxScoreOptimizer(ps, lr=1e-3, dataset_size=50_000),   # default: compiled
        "ProxScore eager": lambda ps: ProxScoreOptimizer(ps, lr=1e-3, dataset_size=50_000, compiled=False),
        "ProxScore inner_steps=2": lambda ps: ProxScoreOptimizer(ps, lr=1e-3, dataset_size=50_000,
                                                                 inner_steps=2),
        "ProxScore betas=(0, 0.999)": lambda ps: ProxScoreOptimizer(ps, lr=1e-3, dataset_size=50_000,
                                                                    betas=(0.0, 0.999)),
        "ProxScore elementwise_flow": lambda ps: ProxScoreOptimizer(ps, lr=1e-3, dataset_size=50_000,
                                                                    family="elementwise_flow"),
        "ProxScore elementwise_flow compiled": lambda ps: ProxScoreOptimizer(
            ps, lr=1e-3, dataset_size=50_000, family="elementwise_flow", compiled=True),
        "ProxScore compiled": lambda ps: ProxScoreOptimizer(ps, lr=1e-3, dataset_size=50_000, compiled=True),
        "ProxScore compiled, betas=(0, 0.999)": lambda ps: ProxScoreOptimizer(
            ps, lr=1e-3, dataset_size=50_000, compiled=True, betas=(0.0, 0.999)),
        # rule="solved" (issue 19): Adam on the mean, or the Newton mean (3 state tensors)
        "ProxScore solved": lambda ps: ProxScoreOptimizer(ps, lr=1e-3, dataset_size=50_000, rule="solved"),
        "ProxScore solved eager": lambda ps: ProxScoreOptimizer(ps, lr=1e-3, dataset_size=50_000, rule="solved",
                                                                compiled=False),
        "ProxScore solved newton": lambda ps: ProxScoreOptimizer(ps, lr=0.1, dataset_size=50_000, rule="solved",
                                                                 mean_update="newton"),
        "ProxScore solved newton eager": lambda ps: ProxScoreOptimizer(
            ps, lr=0.1, dataset_size=50_000, rule="solved", mean_update="newton", compiled=False),
    }
    try:
        import ivon

        out["IVON"] = lambda ps: ivon.IVON(ps, lr=0.1, ess=50_000)
    except ImportError:
        print("(ivon-opt not installed: pip install ivon-opt)")
    return out


def make_step(name, opt, params):
    if name == "IVON":
        def step():
            with opt.sampled_params(train=True):
                pass
            opt.step()
        return step
    return opt.step


def state_bytes(opt) -> int:
    """Bytes of every non-scalar tensor the optimizer saves (IVON keeps its state in the groups)."""
    seen, total = set(), 0
    for t in tensors_in(opt.state_dict()):
        # a tensor shared by two entries counts once; views of one buffer each count
        if t.dim() > 0 and (t.data_ptr(), t.numel()) not in seen:
            seen.add((t.data_ptr(), t.numel()))
            total += t.numel() * t.element_size()
    return total


def reuse_freed_memory() -> None:
    """glibc: serve allocations up to 32 MiB from the heap and never trim it (no fresh pages)."""
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 2**31 - 1)):
        raise SystemExit("--reuse-freed-memory needs glibc's mallopt")


def page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_size(millions: int, steps: int, device, only: list[str] | None = None) -> list[tuple]:
    grads = [torch.randn(p.shape, device=device) * 1e-3 for p in vit_shaped(millions, device)]
    n = sum(g.numel() for g in grads)
    runs = {}
    chosen = optimizers(device)
    if only is not None:
        unknown = set(only) - set(chosen)
        if unknown:
            raise SystemExit(f"unknown --optimizers {sorted(unknown)}; choose from {sorted(chosen)}")
        chosen = {k: v for k, v in chosen.items() if k in only or k == "Adam (foreach)"}
    for name, factory in chosen.items():
        params = [torch.nn.Parameter(torch.randn(g.shape, device=device) * 0.02) for g in grads]
        for p, g in zip(params, grads):
            p.grad = g
        try:
            opt = factory(params)
            step = make_step(name, opt, params)
            step()                                  # the first step builds state (and compiles)
        except Exception as err:  # noqa: BLE001  (e.g. fused AdamW unsupported here; a failed compile)
            print(f"  {name}: skipped ({type(err).__name__}: {str(err).splitlines()[0][:200]})", flush=True)
            continue
        runs[name] = (opt, step, [])
    faults = dict.fromkeys(runs, 0)
    for i in range(steps + 3):
        for name, (_, step, times) in runs.items():
            sync(device)
            f0, t0 = page_faults(), time.perf_counter()
            step()
            sync(device)
            if i >= 3:
                times.append(time.perf_counter() - t0)
                faults[name] += page_faults() - f0
    base = statistics.median(runs["Adam (foreach)"][2])
    fused = statistics.median(runs["AdamW (fused)"][2]) if "AdamW (fused)" in runs else float("nan")
    rows = []
    for name, (opt, step, times) in runs.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step()
            sync(device)
            peak = torch.cuda.max_memory_allocated() - before
        else:
            with PeakTemporaries() as tracker:
                step()
            # ProxScore's eager step takes its temporaries from a workspace kept between steps
            workspace = getattr(opt, "__dict__", {}).get("_workspace")
            peak = tracker.peak + (workspace.nbytes if workspace is not None else 0)
        med = statistics.median(times)
        rows.append((millions, n, name, med * 1e3, med / base, med / fused, state_bytes(opt) / n, peak / n,
                     faults[name] / steps))
    return rows


def training_step_ratio(device, steps: int) -> list[tuple]:
    """Forward + backward + step of a small ViT (torchvision), ProxScore/ADVI against Adam."""
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    x = torch.randn(32, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (32,), device=device)
    runs = {}
    for name, factory in (("Adam (foreach)", lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True)),
                          ("ProxScore", lambda ps: ProxScoreOptimizer(ps, lr=1e-3, dataset_size=50_000)),
                          ("ProxScore compiled", lambda ps: ProxScoreOptimizer(ps, lr=1e-3, dataset_size=50_000,
                                                                               compiled=True)),
                          ("ADVI", lambda ps: ADVI(ps, lr=1e-3, dataset_size=50_000))):
        torch.manual_seed(0)
        model = VisionTransformer(image_size=32, patch_size=4, num_layers=6, num_heads=4, hidden_dim=192,
                                  mlp_dim=768, num_classes=10).to(device)
        runs[name] = (model, factory(model.parameters()), [])
    for i in range(steps + 3):
        for model, opt, times in runs.values():
            sync(device)
            t0 = time.perf_counter()
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sync(device)
            if i >= 3:
                times.append(time.perf_counter() - t0)
    n = sum(p.numel() for p in runs["Adam (foreach)"][0].parameters())
    base = statistics.median(runs["Adam (foreach)"][2])
    return [(n, name, statistics.median(t) * 1e3, statistics.median(t) / base) for name, (_, _, t) in runs.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[1, 10, 50], choices=sorted(SHAPES))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--optimizers", nargs="*", default=None,
                    help="only these rows (names as printed; Adam (foreach) is always kept as the base)")
    ap.add_argument("--no-training-step", action="store_true")
    ap.add_argument("--reuse-freed-memory", action="store_true",
                    help="glibc keeps and reuses freed memory: no optimizer pays for fresh pages")
    args = ap.parse_args()
    if not args.no_training_step:
        import requires

        requires.require(["torchvision"], why="for its ViT training step (--no-training-step skips it)")
    if args.reuse_freed_memory:
        reuse_freed_memory()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads")
    print("| size | optimizer | step ms | ratio to Adam | ratio to fused AdamW | state bytes/param "
          "| peak temporaries bytes/param | page faults/step |")
    print("|---|---|---|---|---|---|---|---|")
    for millions in args.sizes:
        for _, n, name, ms, ratio, to_fused, state, peak, faults in run_size(millions, args.steps, device,
                                                                             args.optimizers):
            print(f"| {n / 1e6:.1f}M | {name} | {ms:.2f} | {ratio:.2f} | {to_fused:.2f} | {state:.1f} | {peak:.1f} "
                  f"| {faults:.0f} |", flush=True)
    if not args.no_training_step:
        print("\n| ViT params | optimizer | train step ms | ratio to Adam |\n|---|---|---|---|")
        for n, name, ms, ratio in training_step_ratio(device, args.steps):
            print(f"| {n / 1e6:.2f}M | {name} | {ms:.1f} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
