#!/usr/bin/python3
"""Does clustering-based data reduction help? The tiny model (configs/tiny.yaml) trained for the
same number of steps on all training records, on a random half, and on each strategy's half
(hashed n-gram embeddings, cosine k-means, configs/reduce.yaml's settings), every model scored on
one common validation split of the full fortunes corpus that no arm trains on.

Writes results/reduction_helps.md and results/reduction_val_loss.png.
  experiments/reduction_helps.py [--steps 2000] [--seeds 1]
"""
import argparse
import math
import os
import tempfile
import time

import numpy as np
import yaml

from common import ROOT, hybrit, machine_header

STRATEGIES = ["nearest", "balanced", "semdedup", "hard"]


def val_windows(records, context):
    """The byte tokenizer's stream of the validation records, cut into consecutive windows."""
    stream = []
    for r in records:
        stream.extend(r.encode())
        stream.append(256)  # end of record
    stream = np.array(stream, dtype=np.int32)
    n = (len(stream) - 1) // context
    inputs = stream[: n * context].reshape(n, context)
    targets = stream[1: n * context + 1].reshape(n, context)
    return inputs, targets


def val_loss(trainer, model_cfg, inputs, targets, batch=64):
    model = hybrit.Model(model_cfg)
    params = model.parameters()
    for name, values in trainer.parameters().items():
        params[name][...] = values
    total = 0.0
    for start in range(0, len(inputs), batch):
        x, y = inputs[start: start + batch], targets[start: start + batch]
        total += model.forward(np.ascontiguousarray(x), np.ascontiguousarray(y)) * len(x)
    return total / len(inputs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seeds", type=int, default=1, help="training seeds per arm")
    ap.add_argument("--eval-every", type=int, default=250)
    args = ap.parse_args()

    tiny = yaml.safe_load(open(os.path.join(ROOT, "configs", "tiny.yaml")))
    records = hybrit.read_corpus(["/usr/share/games/fortunes"])["records"]
    rng = np.random.default_rng(12345)
    is_val = rng.random(len(records)) < 0.05
    val = [r for r, v in zip(records, is_val) if v]
    pool = [r for r, v in zip(records, is_val) if not v]
    work = tempfile.mkdtemp(prefix="reduction-helps-")
    pool_path = os.path.join(work, "pool.fortune")
    with open(pool_path, "w") as f:
        f.write("".join(r + "\n%\n" for r in pool))
    print(f"{len(records)} records: {len(pool)} for training, {len(val)} for the common validation split; work in {work}")

    reduce_cfg = yaml.safe_load(open(os.path.join(ROOT, "configs", "reduce.yaml")))
    reduce_cfg["data"] = {"sources": [pool_path], "format": "fortune"}
    corpora, reports = {"all": pool_path}, {}
    for strategy in ["random"] + STRATEGIES:
        cfg = dict(reduce_cfg, reduce={"strategy": strategy, "fraction": 0.5})
        t = time.time()
        rep = hybrit.reduce(cfg, out=os.path.join(work, strategy))
        reports[strategy] = dict(rep, wall=time.time() - t)
        corpora[f"{strategy} 50%"] = rep["output"]
        print(f"reduce {strategy}: kept {rep['kept']} in {time.time() - t:.1f} s")

    context = tiny["model"]["context"]
    inputs, targets = val_windows(val, context)
    results = {}
    for arm, corpus in corpora.items():
        for seed in range(1, args.seeds + 1):
            cfg = dict(tiny, seed=seed)
            cfg["data"] = dict(tiny["data"], sources=[corpus], val_fraction=0.01)
            cfg["train"] = dict(tiny["train"], steps=args.steps, sample_tokens=0, eval_every=0)
            trainer = hybrit.Trainer(cfg)
            model_cfg = yaml.safe_load(trainer.config_yaml())["model"]
            curve, t = [], time.time()
            for step in range(1, args.steps + 1):
                trainer.step()
                if step % args.eval_every == 0 or step == args.steps:
                    curve.append((step, val_loss(trainer, model_cfg, inputs, targets)))
            results.setdefault(arm, []).append(curve)
            print(f"{arm:14s} seed {seed}: common val loss {curve[-1][1]:.4f} ({time.time() - t:.0f} s)", flush=True)

    out_dir = os.path.join(ROOT, "experiments", "results")
    final = {arm: [c[-1][1] for c in curves] for arm, curves in results.items()}
    base = np.mean(final["all"])
    lines = [machine_header("Does data reduction help? (tiny model, fortunes)",
                            f"experiments/reduction_helps.py --steps {args.steps} --seeds {args.seeds}"),
             f"Corpus: {len(records)} fortunes records; a fixed 5% ({len(val)} records, {inputs.size} tokens) is the common validation "
             f"split, scored in full (every token, windows of {context}); the other {len(pool)} records are the pool each arm draws from.",
             f"Every arm trains configs/tiny.yaml for {args.steps} steps (batch 12 x 64 tokens, "
             f"{args.steps * 12 * 64 / 1e6:.2f} M tokens) with the same seed(s); only the records differ.",
             "Reductions: configs/reduce.yaml (1024-d hashed char 3-5 / word 1-2 gram TF-IDF, spherical k-means with k = 100) with the strategy named, keeping 50%.",
             "", "| arm | records | val loss (mean over seeds) | each seed | vs all |", "|---|---|---|---|---|"]
    for arm in results:
        n = len(pool) if arm == "all" else reports[arm.split()[0]]["kept"]
        v = final[arm]
        lines.append(f"| {arm} | {n} | {np.mean(v):.4f} | {', '.join(f'{x:.4f}' for x in v)} | {np.mean(v) - base:+.4f} |")
    lines += ["", "Reduction timings (2 threads): " + ", ".join(
        f"{s} {reports[s]['seconds']['total']:.1f} s" for s in reports) + "."]
    with open(os.path.join(out_dir, "reduction_helps.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, curves in results.items():
        steps = [s for s, _ in curves[0]]
        mean = np.mean([[v for _, v in c] for c in curves], axis=0)
        ax.plot(steps, mean, marker="o", ms=3, label=arm, lw=2.2 if arm in ("all", "random 50%") else 1.4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss on the common validation split (nats/byte)")
    ax.set_title("tiny model on fortunes: all records vs. 50% reductions")
    lo = min(min(v for _, v in c) for cs in results.values() for c in cs)
    ax.set_ylim(lo - 0.05, lo + 0.8)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "reduction_val_loss.png"), dpi=120)


if __name__ == "__main__":
    main()
