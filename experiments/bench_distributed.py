"""Data-parallel training and data reduction over MPI on this machine, and a written model of N machines.

Per shape, three ways to spend the machine, interleaved over rounds (medians and spread):
  1 rank x 1 thread    the baseline: one core
  2 ranks x 1 thread   `mpirun -np 2 hybrit train`: the ratio to the baseline shows what the
                       gradient all-reduce and the sharded Muon cost (ideal 2x)
  1 rank x 2 threads   the same two cores through the thread pool instead
Tokens/s is the median of each run's per-step figures after its first steps (metrics.jsonl).
Bytes all-reduced per step are the gradient buffer's (4 bytes a parameter, one sum per step).

The model of N machines: a ring all-reduce moves 2 (N - 1) / N x gradient bytes over each link
and takes 2 (N - 1) latency hops per bucket (hybrit sums one bucket per block plus two); a rank's
compute per step is its tokens over its measured tokens/s. Efficiency = compute / (compute + comm)
with no overlap (the backward does overlap the sums; this is the pessimistic bound).

Reduction (--part reduce, results/distributed_reduce.md): `hybrit reduce configs/reduce.yaml` on the
whole fortunes corpus, the same three ways, seconds per stage from report.json (rank 0's clock).
The k-means all-reduces k x d doubles of sums and k counts per Lloyd iteration.

  /usr/bin/python3 experiments/bench_distributed.py [--rounds 3] [--part train|reduce|all]
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CLI, ROOT, machine_header  # noqa: E402

MPIRUN = [shutil.which("mpirun") or "mpirun", "--allow-run-as-root", "--oversubscribe", "--mca", "btl_vader_single_copy_mechanism", "none"]
SHAPES = {  # name: (--set overrides, steps)
    "demo (tiny.yaml: 4 x 128, context 64, batch 12)": ([], 30),
    "small.yaml (6 x 256, GQA 8/4, context 128, batch 16)": (["model.dim=256", "model.n_layers=6", "model.n_heads=8", "model.n_kv_heads=4",
                                                            "model.context=128", "train.batch=16"], 8),
}
WAYS = {"1 rank x 1 thread": (1, 1), "2 ranks x 1 thread": (2, 1), "1 rank x 2 threads": (1, 2)}
SKIP_STEPS = 2  # the first steps warm caches and the thread pool


def run(ranks, threads, sets, steps):
    out = tempfile.mkdtemp(prefix="hybrit-bench-dist-")
    try:
        args = [CLI, "train", os.path.join(ROOT, "configs", "tiny.yaml"), "--out", out, "--set", f"train.steps={steps}",
                "--set", "train.sample_tokens=0", "--set", f"train.eval_every={steps * 10}", "--set", "train.checkpoint_every=0"]
        for s in sets:
            args += ["--set", s]
        env = {k: v for k, v in os.environ.items() if not k.startswith("HYBRIT_")}
        env["HYBRIT_THREADS"] = str(threads)
        command = ([*MPIRUN, "-np", str(ranks)] if ranks > 1 else []) + args
        r = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{r.stderr[-2000:]}")
        params = int(re.search(r"run \S+: (\d+) parameters", r.stderr).group(1))
        lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
        rates = [m["tokens_per_s"] for m in lines[SKIP_STEPS:]]
        tokens_per_step = lines[0]["tokens"]
        return statistics.median(rates), params, tokens_per_step
    finally:
        shutil.rmtree(out, ignore_errors=True)


def run_reduce(ranks, threads, strategy):
    out = tempfile.mkdtemp(prefix="hybrit-bench-reduce-")
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HYBRIT_")}
        env["HYBRIT_THREADS"] = str(threads)
        command = ([*MPIRUN, "-np", str(ranks)] if ranks > 1 else []) + [CLI, "reduce", os.path.join(ROOT, "configs", "reduce.yaml"), "--out",
                                                                        os.path.join(out, "r"), "--set", f"reduce.strategy={strategy}"]
        r = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{r.stderr[-2000:]}")
        report = json.load(open(os.path.join(out, "r", "report.json")))
        return report
    finally:
        shutil.rmtree(out, ignore_errors=True)


def reduce_part(rounds, out_path):
    lines = [machine_header("Data reduction over MPI (mpirun -np N hybrit reduce)",
                            f"/usr/bin/python3 experiments/bench_distributed.py --part reduce --rounds {rounds}")]
    for strategy in ("nearest", "semdedup"):
        seconds = {w: {} for w in WAYS}
        report = None
        for r in range(rounds):
            names = list(WAYS)
            for i in range(len(names)):  # rotated order: drift hits every way alike
                w = names[(i + r) % len(names)]
                report = run_reduce(*WAYS[w], strategy)
                for stage, secs in report["seconds"].items():
                    seconds[w].setdefault(stage, []).append(secs)
                print(f"reduce {strategy} | {w}: {report['seconds']['total']:.2f} s", flush=True)
        k, d = report["kmeans"]["k"], report["embedding"]["dim"]
        lines += [f"### configs/reduce.yaml, strategy {strategy}: {report['input']['records']:,} records, {d}-d n-gram embeddings, k {k}, "
                  f"{report['kmeans']['iterations']} k-means iterations", "",
                  f"All-reduced per k-means iteration: {(k * d * 8 + k * 8) / 2**10:,.0f} KiB (sums and counts); near-duplicate scoring moves each "
                  f"cluster's rows to the rank that scores it once (MPI_Alltoallv, at most {report['input']['records'] * d * 4 / 2**20:.0f} MiB in all).", "",
                  "| ranks x threads | embed s | k-means s | select s | total s (median, min-max) | total vs 1 x 1 |", "|---|---|---|---|---|---|"]
        base = statistics.median(seconds["1 rank x 1 thread"]["total"])
        for w in WAYS:
            st = seconds[w]
            med = {stage: statistics.median(v) for stage, v in st.items()}
            lines.append(f"| {w} | {med['embed']:.2f} | {med['kmeans']:.2f} | {med['select']:.2f} | {med['total']:.2f} "
                         f"({min(st['total']):.2f}-{max(st['total']):.2f}) | {base / med['total']:.2f}x |")
        lines.append("")
    lines += ["The selection and the reduced corpus are the ones one process writes (tests/python/test_distributed.py checks it for "
              "every strategy at 2 and 3 ranks).", ""]
    with open(out_path, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--part", choices=["train", "reduce", "all"], default="all")
    ap.add_argument("--out", default=os.path.join(ROOT, "experiments", "results", "distributed.md"), help="the training part's results")
    ap.add_argument("--reduce-out", default=os.path.join(ROOT, "experiments", "results", "distributed_reduce.md"), help="the reduction part's results")
    a = ap.parse_args()
    if a.part in ("reduce", "all"):
        reduce_part(a.rounds, a.reduce_out)
    if a.part == "reduce":
        return
    lines = [machine_header("Data-parallel training over MPI (mpirun -np N hybrit train)",
                            f"/usr/bin/python3 experiments/bench_distributed.py --rounds {a.rounds}")]
    version = subprocess.run(["mpirun", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    lines += [f"- MPI: {version}; ranks on one machine talk through shared memory (Open MPI's vader BTL)", ""]
    model_inputs = None
    for shape, (sets, steps) in SHAPES.items():
        rates = {w: [] for w in WAYS}
        params = tokens = 0
        for r in range(a.rounds):
            names = list(WAYS)
            for i in range(len(names)):  # rotated order: drift hits every way alike
                w = names[(i + r) % len(names)]
                rate, params, tokens = run(*WAYS[w], sets, steps)
                rates[w].append(rate)
                print(f"{shape} | {w}: {rate:.0f} tokens/s", flush=True)
        base = statistics.median(rates["1 rank x 1 thread"])
        lines += [f"### {shape}: {params / 1e6:.2f}M parameters, {tokens} tokens a step", "",
                  f"Gradient all-reduced per step: {params * 4 / 2**20:.1f} MiB (the whole buffer once, in n_layers + 2 buckets)", "",
                  "| ranks x threads | tokens/s (median) | spread (min-max) | vs 1 x 1 |", "|---|---|---|---|"]
        for w in WAYS:
            m = statistics.median(rates[w])
            lines.append(f"| {w} | {m:,.0f} | {min(rates[w]):,.0f}-{max(rates[w]):,.0f} | {m / base:.2f}x |")
        lines.append("")
        model_inputs = (params, tokens, base)  # the larger shape's figures feed the model
    # The written model: per-rank compute from the larger shape's one-core rate, scaled by size.
    params, tokens, rate = model_inputs
    flops_per_s = 6 * params * rate  # achieved model FLOP/s of one core (6 P per token, attention left out)
    lines += ["### N machines: when does data parallelism stay above 90%?", "",
              f"One core here trains at {rate:,.0f} tokens/s on the {params / 1e6:.1f}M model, about {flops_per_s / 1e9:.1f} GFLOP/s of "
              "model FLOPs (6 x parameters per token). A rank is one machine of C such cores; its step is its share of tokens at "
              "C x that rate. Ring all-reduce of 4 P bytes: 2 (N-1)/N x 4P / bandwidth + 2 (N-1) x latency x (layers + 2) buckets. "
              "No overlap assumed (the real backward overlaps the sums, so this is a lower bound on efficiency).", "",
              "The compute/communication ratio does not depend on the model size at large sizes: both grow with P. "
              "Per-rank tokens per step and the link decide; the latency term decides for small models.", ""]
    links = {"1 Gbit/s Ethernet (latency 50 us)": (1e9 / 8, 50e-6), "10 Gbit/s Ethernet (20 us)": (10e9 / 8, 20e-6),
             "100 Gbit/s InfiniBand (2 us)": (100e9 / 8, 2e-6)}
    cores, N = 32, 8
    lines += [f"Predicted efficiency, {N} machines of {cores} cores each, 16,384 tokens per machine per step:", "",
              "| model | " + " | ".join(links) + " |", "|---|" + "---|" * len(links)]
    for size, layers in ((1e6, 4), (10e6, 6), (100e6, 12), (1e9, 24)):
        row = [f"{size / 1e6:,.0f}M parameters, {layers} layers"]
        for bandwidth, latency in links.values():
            compute = 16384 * 6 * size / (cores * flops_per_s)
            comm = 2 * (N - 1) / N * 4 * size / bandwidth + 2 * (N - 1) * latency * (layers + 2)
            row.append(f"{compute / (compute + comm):.0%}")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"Tokens per machine per step that keep {N} machines at 90% (compute >= 9 x communication), 100M parameters, 12 layers:", ""]
    for name, (bandwidth, latency) in links.items():
        comm = 2 * (N - 1) / N * 4 * 100e6 / bandwidth + 2 * (N - 1) * latency * 14
        need = 9 * comm * cores * flops_per_s / (6 * 100e6)
        lines.append(f"- {name}: {need:,.0f} tokens")
    lines += ["", "Gradient accumulation raises the tokens per step without more memory: hybrit sums once per optimizer "
              "step, whatever train.grad_accum is.", ""]
    with open(a.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
