"""Mutation audit of the test suite: plant one single-line bug at a time in the update math and
check that some test fails.

    python benchmarks/mutation_audit.py            # every mutation (about 2 min)
    python benchmarks/mutation_audit.py 3 7        # only mutations 3 and 7

Each mutation is applied to a fresh copy of the committed tree (``git archive HEAD``), and the
targeted tests run on it with ``-x`` (the first failing test is printed; SURVIVED means no test
noticed the bug). The copy is imported through ``PYTHONPATH``, ahead of the editable install.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
K = "torch_proxvi/kernels/"
# (what the bug is, file, text, replacement): each text occurs exactly once in its file
MUTATIONS = [
    ("temperature inverted in the score scale", K + "hyper.py",
     'score_scale=-float(group["dataset_size"]) / float(group["temperature"])',
     'score_scale=-float(group["dataset_size"]) * float(group["temperature"])'),
    ("prior mean dropped from the score", K + "score.py",
     "centred = theta if prior_mean is None else theta - prior_mean", "centred = theta"),
    ("compiled path samples with 1.5 sigma", K + "dispatch.py",
     "hash_normal(key, p.numel(), dtype, p.device)", "1.5 * hash_normal(key, p.numel(), dtype, p.device)"),
    ("element-wise flow KL negated", "torch_proxvi/families/sinh_arcsinh.py",
     "return (log_prob(theta, *params) - log_prob(theta, *others)).sum()",
     "return (log_prob(theta, *others) - log_prob(theta, *params)).sum()"),
    ("scale gradient biased by 0.7", K + "gaussian.py",
     "grad_log_scale = 4 * weight * (-d_sq_mean / var - ds_mean)",
     "grad_log_scale = 0.7 * 4 * weight * (-d_sq_mean / var - ds_mean)"),
    ("Adam bias correction without the square root", K + "adam.py",
     "bias2_sqrt = (1 - beta2**step) ** 0.5", "bias2_sqrt = (1 - beta2**step)"),
    ("flat path noise x1.5", K + "dispatch.py",
     "                normal_(piece, generator)\n",
     "                normal_(piece, generator).mul_(1.5)\n"),
    ("chunk pieces not a multiple of 16", K + "layout.py",
     "limit = max(16, limit - limit % 16)", "limit = max(16, limit)"),
    ("compiled kernel's numbers: lr and scale_lr swapped", K + "hyper.py",
     "return cls(*numbers.unbind(), *static)",
     "n = list(numbers.unbind())\n        n[0], n[1] = n[1], n[0]\n        return cls(*n, *static)"),
    ("warm-up ends one step late", K + "hyper.py",
     'update_scale=bool(outer_steps >= group["warmup_steps"])',
     'update_scale=bool(outer_steps > group["warmup_steps"])'),
    ("ELBO entropy gradient loses its -1", K + "gaussian.py",
     "grad_log_scale = -lik_u_score + h.prior_precision * var_t - 1",
     "grad_log_scale = -lik_u_score + h.prior_precision * var_t"),
    ("step counter +1 per step with inner_steps > 1", K + "dispatch.py",
     'torch._foreach_add_([st["step"] for st in states], float(h.inner_steps))',
     'torch._foreach_add_([st["step"] for st in states], 1.0)'),
    ("a kernel that failed to build is rebuilt every step", K + "dispatch.py",
     "fn = kernel or (kernel_body if device.type in _failed else compiled_kernel())",
     "fn = kernel or compiled_kernel()"),
    ("residual mean update loses the sigma_t^2/sigma^2 weight", K + "gaussian.py",
     "grad_mean = 2 * weight * (-d_mean / var - score_mean)",
     "grad_mean = 2 * (-d_mean / var - score_mean)"),
    ("log-scale clamp removed", K + "gaussian.py",
     "            log_scale.clamp_(LOG_SCALE_MIN, LOG_SCALE_MAX)\n", ""),
    ("packed state is a copy, never written back", K + "layout.py",
     "    base = flat_buffer_of(views)\n",
     "    return _flatten_dense_tensors(views)\n    base = flat_buffer_of(views)\n"),
    ("proximal KL term negated (Gaussian)", K + "gaussian.py",
     "grad_mean = grad_mean + h.prox_weight * delta / var_t",
     "grad_mean = grad_mean - h.prox_weight * delta / var_t"),
    ("single path draws noise in parameter order, not canonical order", K + "dispatch.py",
     "    for i in order:\n        p, state = params[i], states[i]\n        noise =",
     "    for i in range(len(params)):\n        p, state = params[i], states[i]\n        noise ="),
    ("sample m + sigma^2 eps", K + "gaussian.py",
     'return state["mean"] + torch.exp(state["log_scale"]) * noise',
     'return state["mean"] + torch.exp(2 * state["log_scale"]) * noise'),
    # rule="solved" (issue 19)
    ("solved: precision trust weight 4x too small", K + "newton.py",
     "lam = 4 * (1 - rho) / rho", "lam = (1 - rho) / rho"),
    ("solved: Newton mean without the p^2 of the closed form", K + "newton.py",
     "p2 = p * p", "p2 = p"),
    ("solved: baseline added instead of subtracted", K + "newton.py",
     "u_score = u_score + u_mean * _debiased(avg, h.beta1, h.step)",
     "u_score = u_score - u_mean * _debiased(avg, h.beta1, h.step)"),
    ("solved: log-scale moves by log p instead of log(p)/2", K + "newton.py",
     "log_scale.sub_(0.5 * torch.log(p))", "log_scale.sub_(torch.log(p))"),
    ("solved: the Adam mean takes the exact root (biased up under noise)", K + "newton.py",
     'iterations = NEWTON_ITERS if h.mean_update == "newton" else 0', "iterations = NEWTON_ITERS"),
    ("solved: the first-order root's lower end without b+", K + "newton.py",
     "p = (lam - 4 * b.clamp_max(0)) / (lam + 4 * a + 4 * b.clamp_min(0))",
     "p = (lam - 4 * b.clamp_max(0)) / (lam + 4 * a)"),
    ("solved: the first-order root's numerator without the min(b, 0)", K + "newton.py",
     "p = (lam - 4 * b.clamp_max(0)) /", "p = (lam - 4 * b) /"),
]
TESTS = ["tests/test_solved_step.py", "tests/test_kernels.py", "tests/test_paths.py", "tests/test_properties.py",
         "tests/test_advi.py",
         "tests/test_families.py", "tests/test_contract.py", "tests/test_optimizer.py", "tests/test_errors.py",
         "tests/test_family_usage.py", "tests/test_inference.py"]


def run(index: int, name: str, path: str, old: str, new: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        target = Path(tmp, path)
        text = target.read_text()
        if text.count(old) != 1:
            return f"{index:2d} | {name} | NOT APPLIED (the text occurs {text.count(old)} times) | |"
        target.write_text(text.replace(old, new))
        start = time.time()
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider",
                                 *TESTS], cwd=tmp, env=dict(os.environ, PYTHONPATH=tmp), capture_output=True,
                                text=True)
    failed = [line for line in result.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    if failed:
        verdict = "`" + failed[0].split(" - ")[0].split(" ", 1)[1] + "`"
    else:
        verdict = "SURVIVED" if result.returncode == 0 else f"exit {result.returncode}"
    return f"{index:2d} | {name} | {verdict} | {time.time() - start:.0f} s |"


def main() -> None:
    chosen = {int(a) for a in sys.argv[1:]}
    print("| # | planted bug | first failing test | time |\n|---|---|---|---|")
    for index, mutation in enumerate(MUTATIONS):
        if not chosen or index in chosen:
            print("| " + run(index, *mutation), flush=True)


if __name__ == "__main__":
    main()
