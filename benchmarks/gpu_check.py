"""Every GPU check in one short job (never part of CI): CUDA tests, real-size training with AMP,
and the bare optimizer step at ViT-B and ViT-L sizes.

    python benchmarks/gpu_check.py --out gpu_check.md      # about 8 minutes on one H100
    python benchmarks/gpu_check.py --smoke                 # a minute: tiny sizes, same code paths
    python benchmarks/gpu_check.py --smoke --device cpu    # checks the script where there is no GPU

1. ``tests/test_cuda.py``: the CUDA update against the CPU's in float64 (the flat path on CUDA
   against the CPU's single-tensor path too), the compiled (Triton) kernel against its eager body
   (``torch_proxvi.kernels.dispatch.kernel_body``) and the CPU's, step temporaries bounded by
   ``layout.ACCELERATOR_CHUNK_NUMEL``, bf16 weights, fp16 + GradScaler, exact resume.
2. ``benchmarks/step_overhead.py --device cuda`` at 86M (ViT-B, every optimizer) and 304M
   (ViT-L, the optimizers that fit in memory together).
3. A ViT-B/16-shaped Hugging Face ``ViTForImageClassification`` (86M parameters, random init:
   no weights download) and timm's ``vit_base_patch16_224`` (its optimizer made by
   ``timm.optim.create_optimizer_v2(model, "proxvi")``), each trained for ``--steps`` steps on
   random 224x224 batches under bf16 autocast: whole training-step time (forward, backward,
   step) and peak memory of ProxScore against fused AdamW, as ratios.
4. fp16 autocast with ``torch.amp.GradScaler`` on the HF ViT: the loss stays finite and the
   optimizer skips no step of its own.

Each part runs with its own time limit, and its table is appended to ``--out`` as soon as it is
done, so a part that fails or runs out of time leaves the others' results.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from torch_proxvi import ProxScoreOptimizer  # noqa: E402

N = 1_000_000          # dataset_size: a large fine-tuning set
PROX = dict(lr=1e-4, dataset_size=N, prior_mean="init")
VARIANTS = {           # name -> extra ProxScore options (None: fused AdamW)
    "AdamW (fused)": None,
    "ProxScore": {},
    "ProxScore compiled": {"compiled": True},
    "ProxScore betas=(0, 0.999)": {"betas": (0.0, 0.999)},
    "ProxScore elementwise_flow": {"family": "elementwise_flow"},
    "ProxScore compiled, betas=(0, 0.999)": {"compiled": True, "betas": (0.0, 0.999)},
    "ProxScore elementwise_flow compiled": {"family": "elementwise_flow", "compiled": True},
}
STEP_OVERHEAD_304 = ["AdamW (fused)", "ADVI", "ProxScore", "ProxScore betas=(0, 0.999)", "ProxScore compiled",
                     "ProxScore compiled, betas=(0, 0.999)", "IVON"]


def hf_vit(device, smoke):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(num_labels=100) if not smoke else ViTConfig(num_labels=100, hidden_size=64,
                                                                    num_hidden_layers=2, num_attention_heads=4,
                                                                    intermediate_size=128, image_size=32)
    model = ViTForImageClassification(config).to(device)
    return model, (lambda x: model(pixel_values=x).logits), config.image_size


def timm_vit(device, smoke):
    import timm

    name = "vit_base_patch16_224" if not smoke else "vit_tiny_patch16_224"
    kw = {} if not smoke else dict(img_size=32, depth=2)
    return timm.create_model(name, pretrained=False, num_classes=100, **kw).to(device), None, 224 if not smoke else 32


def make_optimizer(model, variant, use_timm):
    extra = VARIANTS[variant]
    if use_timm:
        import timm.optim

        import torch_proxvi.integrations.timm  # noqa: F401  (registers "proxvi")

        if extra is None:
            return timm.optim.create_optimizer_v2(model, "adamw", lr=1e-4, fused=True)
        return timm.optim.create_optimizer_v2(model, "proxvi", **PROX, **extra)
    if extra is None:
        return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    return ProxScoreOptimizer(model.parameters(), **PROX, **extra)


def train(build, variant, args, device, use_timm):
    """Median training-step time (s), peak memory (GiB) and the losses of one run."""
    torch.manual_seed(0)
    model, forward, size = build(device, args.smoke)
    forward = forward or model
    opt = make_optimizer(model, variant, use_timm)
    x = torch.randn(args.batch, 3, size, size, device=device)
    y = torch.randint(0, 100, (args.batch,), device=device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(args.steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        if i >= 10:                 # warm-up: cuBLAS handles, autotuning, the compiled kernel
            times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    del model, opt
    if cuda:
        torch.cuda.empty_cache()
    return statistics.median(times), peak, losses


def training_table(args, device, deadline):
    lines = [f"bf16 autocast, batch {args.batch}, {args.steps} steps (median step after 10 warm-up steps)", "",
             "| model | optimizer | train step ms | ratio to fused AdamW | peak GiB | ratio | first -> last loss |",
             "|---|---|---|---|---|---|---|"]
    for model_name, build, use_timm in (("HF ViT-B/16", hf_vit, False), ("timm vit_base_patch16_224", timm_vit, True)):
        base = None
        for variant in args.variants:
            if time.monotonic() > deadline:
                lines.append(f"| {model_name} | {variant} | (not run: out of time) | | | | |")
                continue
            try:
                t, peak, losses = train(build, variant, args, device, use_timm)
            except Exception as err:  # noqa: BLE001  (one failing row must not lose the table)
                lines.append(f"| {model_name} | {variant} | failed: {type(err).__name__}: {err} | | | | |")
                print(lines[-1], flush=True)
                continue
            base = base or (t, peak)
            lines.append(f"| {model_name} | {variant} | {t * 1e3:.1f} | {t / base[0]:.2f} | {peak:.1f} | "
                         f"{peak / base[1]:.2f} | {losses[0]:.2f} -> {losses[-1]:.2f} |")
            print(lines[-1], flush=True)
    return lines


def scaler_check(args, device, steps=20):
    torch.manual_seed(0)
    model, forward, size = hf_vit(device, args.smoke)
    opt = ProxScoreOptimizer(model.parameters(), **PROX)
    scaler = torch.amp.GradScaler(device.type)
    x = torch.randn(16, 3, size, size, device=device)
    y = torch.randint(0, 100, (16,), device=device)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        with torch.autocast(device.type, dtype=torch.float16):
            loss = F.cross_entropy(forward(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(float(loss.detach()))
    finite = all(v == v and abs(v) < 1e4 for v in losses)
    return [f"fp16 autocast + GradScaler, HF ViT, {steps} steps: losses finite: {finite} "
            f"({losses[0]:.2f} -> {losses[-1]:.2f}); steps the optimizer skipped itself: {opt.skipped_steps}; "
            f"final scale {scaler.get_scale():g}"]


def subprocess_part(cmd, timeout):
    t0 = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        out, status = done.stdout + done.stderr, f"exit {done.returncode}"
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        status = f"stopped after {timeout} s"
    print(out, flush=True)
    return [f"`{' '.join(cmd[1:])}`: {status}, {time.monotonic() - t0:.0f} s", "", out.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", default=None)
    ap.add_argument("--budget", type=float, default=480,
                    help="seconds after which no new training run starts (the job then ends within a minute)")
    ap.add_argument("--parts", nargs="*", default=["tests", "step", "train", "scaler"],
                    choices=["tests", "step", "train", "scaler"])
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                    help="the training table's optimizers (the first is the base of the ratios)")
    ap.add_argument("--smoke", action="store_true", help="tiny models and sizes: checks the script itself")
    ap.add_argument("--device", default="cuda", help="cpu only to check the script (with --smoke)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check.py needs a CUDA device (or --smoke --device cpu to check the script)")
    if args.smoke:
        args.steps, args.batch = min(args.steps, 14), min(args.batch, 4)
    out = Path(args.out) if args.out else None
    start = time.monotonic()

    def emit(title, lines):
        text = f"## {title}\n\n" + "\n".join(lines) + "\n\n"
        print(text, flush=True)
        if out:
            with out.open("a") as f:
                f.write(text)

    machine = (f"{torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB, "
               f"CUDA {torch.version.cuda}" if device.type == "cuda" else "CPU")
    versions = []
    for name in ("transformers", "timm", "ivon"):
        try:
            versions.append(f"{name} {getattr(__import__(name), '__version__', 'installed')}")
        except Exception:  # noqa: BLE001
            versions.append(f"{name} missing")
    emit("Machine", [f"torch {torch.__version__}, {machine}; {', '.join(versions)}"])
    py = sys.executable
    sizes = (["--sizes", "1"] if args.smoke else ["--sizes", "86"])
    if "tests" in args.parts:
        emit("CUDA tests", subprocess_part([py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                                     "tests/test_cuda.py"], timeout=120))
    if "step" in args.parts:
        emit("Optimizer step at ViT-B size", subprocess_part([
            py, "benchmarks/step_overhead.py", "--device", args.device, *sizes, "--steps", "20"], timeout=170))
        emit("Optimizer step at ViT-L size", subprocess_part([
            py, "benchmarks/step_overhead.py", "--device", args.device, "--sizes", "1" if args.smoke else "304",
            "--steps", "20", "--no-training-step", "--optimizers", *STEP_OVERHEAD_304], timeout=100))
    if "train" in args.parts:
        emit("Training a ViT-B/16 with AMP", training_table(args, device, deadline=start + args.budget))
    if "scaler" in args.parts:
        emit("fp16 with GradScaler", scaler_check(args, device))
    emit("Total", [f"{time.monotonic() - start:.0f} s"])


if __name__ == "__main__":
    main()
