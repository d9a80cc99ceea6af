"""GPU checks in one short job (never part of CI): real-size models with AMP on one GPU.

    python benchmarks/gpu_check.py                     # < 10 min on one H100; table on stdout
    python benchmarks/gpu_check.py --out results.md    # and written to a file

1. A ViT-B/16-shaped Hugging Face ``ViTForImageClassification`` (86M parameters, random init:
   no weights download) and timm's ``vit_base_patch16_224`` (through
   ``create_optimizer_v2(model, "proxvi")``), each trained for ``--steps`` steps on random
   224x224 batches under bf16 autocast: step time and peak memory of ProxScore (eager fused
   path, ``compiled=True``, and ``betas=(0, 0.999)``) against fused AdamW, as ratios.
2. fp16 autocast with ``torch.amp.GradScaler``: the loss stays finite and skipped steps are the
   scaler's, not the optimizer's.
3. The bare-step table of ``benchmarks/step_overhead.py --device cuda`` at ViT-B (86M) and
   ViT-L (304M) sizes is a separate command (same script, ``--sizes 86 304``).

Nothing here has been run on a GPU yet by the author of this file (the development machine has
none); the first run's table goes to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent.parent))
from torch_proxvi import ProxScoreOptimizer  # noqa: E402


def hf_vit(device):
    from transformers import ViTConfig, ViTForImageClassification

    model = ViTForImageClassification(ViTConfig(num_labels=100)).to(device)     # ViT-B/16 shape
    return model, lambda x: model(pixel_values=x).logits


def timm_vit(device):
    import timm

    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100).to(device)
    return model, model


OPTIMIZERS = {
    "AdamW (fused)": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
    "ProxScore": lambda ps: ProxScoreOptimizer(ps, lr=1e-4, dataset_size=1_000_000, prior_mean="init"),
    "ProxScore compiled": lambda ps: ProxScoreOptimizer(ps, lr=1e-4, dataset_size=1_000_000, prior_mean="init",
                                                        compiled=True),
    "ProxScore betas=(0, 0.999)": lambda ps: ProxScoreOptimizer(ps, lr=1e-4, dataset_size=1_000_000,
                                                                prior_mean="init", betas=(0.0, 0.999)),
}


def timm_optimizer(model, name):
    import timm.optim

    import torch_proxvi.integrations.timm  # noqa: F401

    if name == "AdamW (fused)":
        return timm.optim.create_optimizer_v2(model, "adamw", lr=1e-4, fused=True)
    extra = {"compiled": True} if "compiled" in name else {}
    if "betas" in name:
        extra["betas"] = (0.0, 0.999)
    return timm.optim.create_optimizer_v2(model, "proxvi", lr=1e-4, dataset_size=1_000_000,
                                          prior_mean="init", **extra)


def train(build, opt_name, steps, batch, device, use_timm_factory=False, amp=torch.bfloat16):
    torch.manual_seed(0)
    model, forward = build(device)
    opt = timm_optimizer(model, opt_name) if use_timm_factory else OPTIMIZERS[opt_name](model.parameters())
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.randint(0, 100, (batch,), device=device)
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=amp):
            loss = F.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()
        torch.cuda.synchronize()
        if i >= 5:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    peak = torch.cuda.max_memory_allocated() / 2**30
    del model, opt
    torch.cuda.empty_cache()
    return statistics.median(times), peak, losses


def scaler_check(device, steps=20):
    torch.manual_seed(0)
    model, forward = hf_vit(device)
    opt = ProxScoreOptimizer(model.parameters(), lr=1e-4, dataset_size=1_000_000, prior_mean="init")
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(16, 3, 224, 224, device=device)
    y = torch.randint(0, 100, (16,), device=device)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = F.cross_entropy(forward(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(float(loss))
    return all(map(lambda v: v == v and abs(v) < 1e4, losses)), opt.skipped_steps, scaler.get_scale()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check.py needs a CUDA device")
    device = torch.device("cuda")
    lines = [f"torch {torch.__version__}, {torch.cuda.get_device_name()}, batch {args.batch}, "
             f"{args.steps} steps, bf16 autocast", "",
             "| model | optimizer | step ms | ratio to fused AdamW | peak GiB | ratio | final loss |",
             "|---|---|---|---|---|---|---|"]
    for model_name, build, factory in (("HF ViT-B/16", hf_vit, False), ("timm vit_base_patch16_224", timm_vit, True)):
        base = None
        for opt_name in OPTIMIZERS:
            t, peak, losses = train(build, opt_name, args.steps, args.batch, device, use_timm_factory=factory)
            base = base or (t, peak)
            lines.append(f"| {model_name} | {opt_name} | {t * 1e3:.1f} | {t / base[0]:.2f} | {peak:.1f} | "
                         f"{peak / base[1]:.2f} | {losses[-1]:.3f} |")
            print(lines[-1], flush=True)
    finite, skipped, scale = scaler_check(device)
    lines += ["", f"fp16 + GradScaler, 20 steps: losses finite {finite}, optimizer-skipped steps {skipped}, "
                  f"final scale {scale:g}"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
