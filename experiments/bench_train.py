#!/usr/bin/python3
"""Training throughput of the nanoGPT-"baby" model (4 layers, dim 128, 4 heads, context 64,
batch 12, byte vocabulary) in hybrit and in PyTorch (Debian's python3-torch), side by side in one
run: the same architecture (PyTorch runs the functional reference that tests/python/
test_model_torch.py checks hybrit's gradients against), the same initial weights, the same
batches, the same optimizer rules (Muon for block matrices, AdamW for the rest, cosine schedule,
clipping at 1.0) and the same number of threads; for quant none and ternary.

Writes results/train_vs_torch.md and results/train_loss_curves.png.
"""
import math
import os
import sys
import time

import numpy as np
import torch

from common import ROOT, hybrit, machine_header

sys.path.insert(0, os.path.join(ROOT, "tests", "python"))
from test_model_torch import reference  # noqa: E402

STEPS, WARMUP_STEPS = 300, 5
THREADS = hybrit.info()["granted_cpus"]


def config(quant):
    return {
        "seed": 1,
        "model": {"dim": 128, "n_layers": 4, "n_heads": 4, "context": 64, "quant": quant, "ffn": "swiglu"},
        "data": {"sources": ["/usr/share/games/fortunes"], "format": "fortune"},
        "train": {"steps": STEPS, "batch": 12, "eval_batches": 8, "sample_tokens": 0},
        "optim": {"grad_clip": 1.0, "schedule": {"kind": "cosine", "warmup_steps": 50, "min_lr_ratio": 0.1},
                  "muon": {"lr": 0.02, "momentum": 0.95}, "adamw": {"lr": 0.003, "beta1": 0.9, "beta2": 0.95}},
    }


def lr_multiplier(step, total=STEPS, warmup=50, min_ratio=0.1):
    warm = (step + 1) / warmup if step < warmup else 1.0
    p = min(max((step - warmup) / max(1, total - warmup), 0.0), 1.0)
    return warm * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def newton_schulz5(g, steps=5):
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.T if g.shape[0] > g.shape[1] else g
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if g.shape[0] > g.shape[1] else x


def run_torch(cfg, initial, batches):
    torch.set_num_threads(THREADS)
    params = {k: torch.tensor(v, requires_grad=True) for k, v in initial.items()}
    matrices = [p for k, p in params.items() if k.startswith("blocks.") and p.dim() == 2]
    others = [p for k, p in params.items() if not (k.startswith("blocks.") and p.dim() == 2)]
    adamw = torch.optim.AdamW(others, lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    momentum = [torch.zeros_like(p) for p in matrices]
    losses, times = [], []
    for step in range(STEPS):
        tokens, targets = batches[step]
        t0 = time.perf_counter()
        for p in params.values():
            p.grad = None
        _, loss = reference(cfg["model"], params, tokens, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        mult = lr_multiplier(step)
        for group in adamw.param_groups:
            group["lr"] = 3e-3 * mult
        adamw.step()
        with torch.no_grad():
            for p, m in zip(matrices, momentum):
                m.lerp_(p.grad, 1 - 0.95)
                update = newton_schulz5(p.grad.lerp(m, 0.95))
                p.add_(update, alpha=-0.02 * mult * max(1.0, p.shape[0] / p.shape[1]) ** 0.5)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return losses, times


def run_hybrit(cfg):
    t = hybrit.Trainer(cfg)
    initial = {k: v.copy() for k, v in t.parameters().items()}
    batches = [t.batch(s) for s in range(STEPS)]
    losses, times = [], []
    for _ in range(STEPS):
        t0 = time.perf_counter()
        m = t.step()
        times.append(time.perf_counter() - t0)
        losses.append(m["loss"])
    return losses, times, initial, batches


def main():
    tokens_per_step = 12 * 64
    rows, curves = [], {}
    for quant in ["none", "ternary"]:
        cfg = config(quant)
        h_losses, h_times, initial, batches = run_hybrit(cfg)
        t_losses, t_times = run_torch(cfg, initial, batches)
        h_rate = tokens_per_step / np.median(h_times[WARMUP_STEPS:])
        t_rate = tokens_per_step / np.median(t_times[WARMUP_STEPS:])
        rows.append((quant, h_rate, t_rate, h_losses, t_losses))
        curves[quant] = (h_losses, t_losses)

    print(machine_header("training throughput: hybrit vs PyTorch, nanoGPT-baby model", "/usr/bin/python3 experiments/bench_train.py"))
    print(f"4 layers, dim 128, 4 heads, context 64, batch 12 (768 tokens a step), byte vocabulary (257), SwiGLU; "
          f"{STEPS} steps, median step time after {WARMUP_STEPS} warm-up steps; {THREADS} threads each; PyTorch {torch.__version__}.\n")
    print("| quant | hybrit tokens/s | PyTorch tokens/s | ratio | loss at step 1 / 100 / 300 (hybrit) | (PyTorch) |")
    print("|---|---|---|---|---|---|")
    for quant, h, t, hl, tl in rows:
        print(f"| {quant} | {h:,.0f} | {t:,.0f} | {h / t:.2f}x | {hl[0]:.3f} / {hl[99]:.3f} / {hl[-1]:.3f} | {tl[0]:.3f} / {tl[99]:.3f} / {tl[-1]:.3f} |")
    print(f"\nGoal: at least 2x PyTorch for both -> {min(h / t for _, h, t, _, _ in rows):.2f}x at the worst.")
    print("Both sides start from the same weights and see the same batches, so their loss curves should overlap: "
          "they differ only by floating-point rounding (and, for ternary, the rare int8 activation that rounds the other way).")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for quant, style in [("none", "-"), ("ternary", "--")]:
        h, t = curves[quant]
        ax.plot(range(1, STEPS + 1), h, style, label=f"hybrit, quant {quant}", linewidth=1.2)
        ax.plot(range(1, STEPS + 1), t, style, label=f"PyTorch, quant {quant}", linewidth=1.2, alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats per byte)")
    ax.set_title("nanoGPT-baby on the fortunes corpus: same weights, same batches")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = os.path.join(ROOT, "experiments", "results", "train_loss_curves.png")
    fig.savefig(out, dpi=110)
    print(f"\nLoss curves: `experiments/results/train_loss_curves.png`.")


if __name__ == "__main__":
    main()
