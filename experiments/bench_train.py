#!/usr/bin/python3
"""Training throughput of hybrit against PyTorch written the way its users write it
(experiments/torch_gpt.py: nn.Linear, plain causal softmax attention, BitNet's fake-quant STE for
the ternary twin, torch.optim.AdamW), side by side in one process, steps interleaved (one hybrit
step, one PyTorch step), on the same initial weights and the same batches, with the same optimizer
(AdamW for every parameter: hybrit's optim.matrices=adamw, so both sides do the same math and
their losses must agree) and the same number of threads.

Shapes: the demo (4 layers, dim 128, context 64, batch 12) and the 10M-parameter model (6 layers,
dim 384, 6 heads) at context 256 (batch 64), 1024 (batch 8) and 2048 (batch 4), quant none and
ternary. For each: median step time and tokens/s, the ratio, model-FLOPs utilisation against the
matmul op's own rate at the step's GEMM shapes (measured here, in the same run), and the loss of
both sides at the last step. Then peak memory at context 2048 (hybrit train, recompute none and
block) against the estimate, and loss curves at the demo shape.

    /usr/bin/python3 experiments/bench_train.py [--quick]

Writes results/train_vs_torch.md and results/train_loss_curves.png.
"""
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from common import CLI, ROOT, hybrit, machine_header
from torch_gpt import GPT, load_hybrit_weights

QUICK = "--quick" in sys.argv
THREADS = hybrit.info()["granted_cpus"]
WARMUP = 1
# (label, layers, dim, heads, context, batch, timed steps)
SHAPES = [("demo", 4, 128, 4, 64, 12, 30), ("ctx256", 6, 384, 6, 256, 64, 5), ("ctx1024", 6, 384, 6, 1024, 8, 5),
          ("ctx2048", 6, 384, 6, 2048, 4, 5)]
if QUICK:
    SHAPES = [(l, L, d, h, c, b, 2) for (l, L, d, h, c, b, _) in SHAPES]
CURVE_STEPS = 60 if QUICK else 200
LR, WARMUP_STEPS, MIN_RATIO = 3e-3, 20, 0.1


def config(layers, dim, heads, context, batch, quant, steps):
    return {
        "seed": 1,
        "model": {"dim": dim, "n_layers": layers, "n_heads": heads, "context": context, "quant": quant, "ffn": "swiglu"},
        "data": {"sources": ["/usr/share/games/fortunes"], "format": "fortune"},
        "train": {"steps": steps, "batch": batch, "eval_batches": 1, "sample_tokens": 0},
        "optim": {"matrices": "adamw", "grad_clip": 1.0, "schedule": {"kind": "cosine", "warmup_steps": WARMUP_STEPS, "min_lr_ratio": MIN_RATIO},
                  "adamw": {"lr": LR, "beta1": 0.9, "beta2": 0.95, "weight_decay": 0.0}},
    }


def lr_multiplier(step, total):
    warm = (step + 1) / WARMUP_STEPS if step < WARMUP_STEPS else 1.0
    p = min(max((step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS), 0.0), 1.0)
    return warm * (MIN_RATIO + (1 - MIN_RATIO) * 0.5 * (1 + math.cos(math.pi * p)))


def torch_side(cfg, trainer):
    m = cfg["model"]
    hd = m["dim"] // m["n_heads"]
    tcfg = dict(m, n_kv_heads=m["n_heads"], ffn_hidden=trainer.parameters()["blocks.0.w_up"].shape[0], vocab_size=257,
                rope_theta=10000.0, norm_eps=1e-5)
    assert hd % 2 == 0
    model = GPT(tcfg)
    load_hybrit_weights(model, trainer.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    total = cfg["train"]["steps"]

    def step(i, tokens, targets):
        opt.zero_grad(set_to_none=True)
        loss = model(tokens, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for g in opt.param_groups:
            g["lr"] = LR * lr_multiplier(i, total)
        opt.step()
        return loss.item()

    return step


def model_flops(layers, dim, heads, context, batch, hidden, vocab=257):
    """Training FLOPs of one step: 6 per parameter of every matmul per token, and causal attention
    counted once (T (T + 1) / 2 query-key pairs): 4 FLOPs per pair and head dimension forward,
    twice that backward."""
    tokens = batch * context
    matmul_params = layers * (4 * dim * dim + 3 * dim * hidden) + vocab * dim
    pairs = batch * heads * context * (context + 1) / 2
    return 6 * tokens * matmul_params + layers * 12 * pairs * (dim // heads)


def gemm_rate(d, layers, dim, context, batch, hidden, vocab=257):
    """The matmul op's GFLOP/s over the GEMMs one training step issues (forward x W^T, dW = dy^T x,
    dx = dy W per linear, and the head), FLOP-weighted: the step's FLOP limit is its matmul FLOPs
    at this rate."""
    n = batch * context
    rng = np.random.default_rng(0)
    shapes = []
    for out_f, in_f, count in [(dim, dim, 4), (hidden, dim, 2), (dim, hidden, 1), (vocab, dim, 1)]:
        shapes += [((n, out_f, in_f), False, True, count), ((out_f, in_f, n), True, False, count), ((n, in_f, out_f), False, False, count)]
    total_flops = total_seconds = 0.0
    for (m, nn_, k), ta, tb, count in shapes:
        a = rng.random((k, m) if ta else (m, k), dtype=np.float32)
        b = rng.random((nn_, k) if tb else (k, nn_), dtype=np.float32)
        c = np.zeros((m, nn_), np.float32)
        d.matmul(a, b, trans_a=ta, trans_b=tb, out=c)
        times = []  # at least 5 calls and 0.2 s: the demo's sub-millisecond GEMMs are noisy
        while len(times) < 5 or sum(times) < 0.2:
            t = time.perf_counter()
            d.matmul(a, b, trans_a=ta, trans_b=tb, out=c)
            times.append(time.perf_counter() - t)
        total_flops += count * 2.0 * m * nn_ * k
        total_seconds += count * statistics.median(times)
    return total_flops / total_seconds / 1e9


def measure(label, layers, dim, heads, context, batch, steps, quant):
    cfg = config(layers, dim, heads, context, batch, quant, steps + WARMUP)
    trainer = hybrit.Trainer(cfg)
    hidden = trainer.parameters()["blocks.0.w_up"].shape[0]
    torch_step = torch_side(cfg, trainer)
    h_times, t_times, h_losses, t_losses = [], [], [], []
    for i in range(steps + WARMUP):
        tokens, targets = trainer.batch(i)
        tt, ty = torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(targets.astype(np.int64))
        # Alternate which side goes first, so drift hits both alike.
        order = ["h", "t"] if i % 2 == 0 else ["t", "h"]
        for side in order:
            t0 = time.perf_counter()
            if side == "h":
                h_losses.append(trainer.step()["loss"])
                h_times.append(time.perf_counter() - t0)
            else:
                t_losses.append(torch_step(i, tt, ty))
                t_times.append(time.perf_counter() - t0)
    metrics = trainer.metrics()
    h = h_times[WARMUP:]
    t = t_times[WARMUP:]
    att = None
    if "attention_forward" in metrics:
        secs = sum(r["seconds"] for op in ("attention_forward", "attention_backward") for r in metrics[op].values())
        work_f = sum(r["elements"] for r in metrics["attention_forward"].values())
        work_b = sum(r["elements"] for r in metrics["attention_backward"].values())
        att = (4 * work_f + 10 * work_b) / secs / 1e9
    return {"label": label, "quant": quant, "tokens": batch * context, "h": statistics.median(h), "t": statistics.median(t),
            "h_spread": (min(h), max(h)), "t_spread": (min(t), max(t)), "h_loss": h_losses[-1], "t_loss": t_losses[-1],
            "flops": model_flops(layers, dim, heads, context, batch, hidden), "gemm": gemm_rate(trainer_dispatcher(), layers, dim, context, batch, hidden),
            "att_gflops": att, "shape": (layers, dim, heads, context, batch)}


_dispatcher = None


def trainer_dispatcher():
    global _dispatcher
    if _dispatcher is None:
        _dispatcher = hybrit.Dispatcher()
    return _dispatcher


def peak_memory(recompute):
    """hybrit train at the context-2048 shape, 3 steps: the peak RSS metrics.jsonl reports."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run")
        subprocess.run([CLI, "train", os.path.join(ROOT, "configs", "tiny.yaml"), "--out", out, "--set", "model.n_layers=6", "--set", "model.dim=384",
                        "--set", "model.n_heads=6", "--set", "model.n_kv_heads=6", "--set", "model.context=2048", "--set", "train.batch=4",
                        "--set", "train.steps=3", "--set", "train.eval_batches=1", "--set", "train.sample_tokens=0", "--set",
                        f"train.recompute={recompute}", "--set", "model.quant=none"], check=True, capture_output=True)
        import json
        lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
        return lines[-1]["peak_rss_bytes"]


def loss_curves():
    curves = {}
    for quant in ["none", "ternary"]:
        cfg = config(4, 128, 4, 64, 12, quant, CURVE_STEPS)
        trainer = hybrit.Trainer(cfg)
        step = torch_side(cfg, trainer)
        h, t = [], []
        for i in range(CURVE_STEPS):
            tokens, targets = trainer.batch(i)
            h.append(trainer.step()["loss"])
            t.append(step(i, torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(targets.astype(np.int64))))
        curves[quant] = (h, t)
    return curves


def main():
    torch.set_num_threads(THREADS)
    rows = [measure(*shape, quant) for shape in SHAPES for quant in ["none", "ternary"]]
    print(machine_header("training throughput: hybrit vs PyTorch written the usual way", "/usr/bin/python3 experiments/bench_train.py"))
    print(f"PyTorch {torch.__version__} (experiments/torch_gpt.py), {THREADS} threads each; AdamW for every parameter on both sides "
          f"(hybrit: optim.matrices=adamw), cosine schedule, clipping at 1.0; the same initial weights and batches; steps interleaved; "
          f"median of {SHAPES[1][6]} timed steps after {WARMUP} warm-up (demo: {SHAPES[0][6]}), [fastest, slowest] in brackets.\n")
    print("| shape (layers, dim, heads, context, batch) | quant | tokens/step | hybrit step | PyTorch step | hybrit vs PyTorch | "
          "matmul op at these shapes | FLOP limit | hybrit MFU | PyTorch MFU | loss at the last step (hybrit / PyTorch) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        limit = r["flops"] / (r["gemm"] * 1e9)
        print(f"| {r['label']} {r['shape']} | {r['quant']} | {r['tokens']:,} | {r['h']:.3f} s [{r['h_spread'][0]:.3f}, {r['h_spread'][1]:.3f}] | "
              f"{r['t']:.3f} s [{r['t_spread'][0]:.3f}, {r['t_spread'][1]:.3f}] | {r['t'] / r['h']:.2f}x | {r['gemm']:.0f} GFLOP/s | "
              f"{limit:.3f} s | {limit / r['h']:.0%} | {limit / r['t']:.0%} | {r['h_loss']:.4f} / {r['t_loss']:.4f} |")
    for r in rows:
        if r["label"] == "ctx1024" and r["att_gflops"]:
            print(f"\nAttention at context 1024 ({r['quant']}): {r['att_gflops']:.0f} GFLOP/s over forward and backward "
                  f"({r['att_gflops'] / r['gemm']:.0%} of the matmul op's rate at the model's GEMM shapes).")
    if not QUICK:
        cfg = config(6, 384, 6, 2048, 4, "none", 1)
        params = sum(v.size for v in hybrit.Trainer(cfg).parameters().values())
        # Parameters, gradients and two AdamW moments (hybrit train keeps Muon's momentum buffer
        # too: 5 copies), and one block's activations with the backward's scratch: per token,
        # 10 values of width dim and 6 of width ffn_hidden (model/model.cpp).
        state = params * 4 * 5
        block = 4 * 2048 * 4 * (384 * 10 + 1024 * 6)
        print(f"\nPeak RSS at context 2048, batch 4, quant none (`hybrit train`, 3 steps; VmHWM); the estimate: parameters + "
              f"optimizer state ({state / 2**20:.0f} MiB) + one block's activations ({block / 2**20:.0f} MiB) = {(state + block) / 2**20:.0f} MiB.\n")
        print("| train.recompute | peak RSS | / estimate |")
        print("|---|---|---|")
        for recompute in ["none", "attention", "block"]:
            peak = peak_memory(recompute)
            print(f"| {recompute} | {peak / 2**20:.0f} MiB | {peak / (state + block):.1f}x |")

        # What recomputation costs in time: hybrit alone, context 1024, 3 timed steps each.
        print("\n| context 1024, quant ternary | step time | vs recompute none |")
        print("|---|---|---|")
        base = None
        for recompute in ["none", "attention", "block"]:
            cfg = config(6, 384, 6, 1024, 8, "ternary", 4)
            cfg["train"]["recompute"] = recompute
            trainer = hybrit.Trainer(cfg)
            trainer.step()
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                trainer.step()
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            base = base or med
            print(f"| train.recompute: {recompute} | {med:.3f} s | {med / base:.2f}x |")

    curves = loss_curves()
    print(f"\nLoss curves at the demo shape, {CURVE_STEPS} steps: `experiments/results/train_loss_curves.png`; |hybrit - PyTorch| "
          + ", ".join(f"{q}: median {statistics.median(abs(a - b) for a, b in zip(*curves[q])):.4f}, largest {max(abs(a - b) for a, b in zip(*curves[q])):.4f}"
                      for q in curves) + ". Ternary codes that round the other way on one side (float rounding in the absmean scale) "
          "make the ternary curves drift apart slowly; they meet the same loss spike and the same level.")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for quant, style in [("none", "-"), ("ternary", "--")]:
        h, t = curves[quant]
        ax.plot(range(1, len(h) + 1), h, style, label=f"hybrit, quant {quant}", linewidth=1.2)
        ax.plot(range(1, len(t) + 1), t, style, label=f"PyTorch, quant {quant}", linewidth=1.2, alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats per byte)")
    ax.set_title("demo model on the fortunes corpus: same weights, same batches, AdamW")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(ROOT, "experiments", "results", "train_loss_curves.png"), dpi=110)


if __name__ == "__main__":
    main()
