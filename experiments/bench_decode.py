#!/usr/bin/python3
"""Decode speed of configs/small.yaml's model: tokens/s at batch 1, 2, 4, 8, 16 with packed 2-bit
weights and with f32 weights (the same ternary values), beside the memory-bandwidth limit (bytes
of weights plus KV read per decode step, over the read bandwidth `hybrit dispatch-report`
measures). The weights are the model's initial ones (speed does not depend on them); every
sequence decodes the same number of tokens (temperature 1, no stop).

Writes results/decode.md.   experiments/bench_decode.py [--tokens 64]
"""
import argparse
import os
import tempfile
import time

import yaml

from common import ROOT, hybrit, machine_header

NOTES_MARKER = "<!-- analysis (by hand) -->"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    cfg = yaml.safe_load(open(os.path.join(ROOT, "configs", "small.yaml")))
    cfg["train"] = dict(cfg.get("train", {}), batch=1, sample_tokens=0)
    trainer = hybrit.Trainer(cfg)
    path = os.path.join(tempfile.mkdtemp(prefix="bench-decode-"), "small.h5")
    trainer.save(path)
    report = hybrit.dispatch_report(quick=True, ops=["quantize_ternary"])
    bandwidth = report["ceilings"]["read_gbps"] * 1e9
    rows = []
    for packed in (True, False):
        gen = hybrit.Generator(path, packed=packed, max_running=16)
        info = gen.info
        for batch in (1, 2, 4, 8, 16):
            prompts = ["The "] * batch
            gen.generate(prompts, max_tokens=4, temperature=1.0, seed=0)  # warm-up
            t = time.perf_counter()
            out = gen.generate(prompts, max_tokens=args.tokens, temperature=1.0, seed=1, stop=None)
            seconds = time.perf_counter() - t
            tokens = sum(len(o["tokens"]) for o in out)
            # a decode step reads every weight once and each sequence's KV (half the run's length on average)
            kv = batch * info["kv_bytes_per_token"] * (4 + args.tokens / 2)
            limit = bandwidth / (info["weight_bytes"] + kv) * batch
            rows.append((packed, batch, tokens / seconds, limit, info["weight_bytes"]))
            print(f"{'packed' if packed else 'f32   '} batch {batch:2d}: {tokens / seconds:8.1f} tokens/s (limit {limit:8.1f})", flush=True)
    lines = [machine_header("Decode speed, configs/small.yaml's model", f"experiments/bench_decode.py --tokens {args.tokens}"),
             f"Read bandwidth (dispatch-report ceiling): {bandwidth / 1e9:.1f} GB/s. Packed weights: {rows[0][4] / 2**20:.2f} MiB; "
             f"f32 weights: {rows[-1][4] / 2**20:.2f} MiB.", "",
             "| weights | batch | tokens/s (all sequences) | bandwidth limit | share of limit | vs batch 1 |", "|---|---|---|---|---|---|"]
    for packed, batch, tps, limit, _ in rows:
        base = next(r[2] for r in rows if r[0] == packed and r[1] == 1)
        lines.append(f"| {'packed 2-bit' if packed else 'f32'} | {batch} | {tps:.1f} | {limit:.1f} | {100 * tps / limit:.0f}% | {tps / base:.2f}x |")
    out = os.path.join(ROOT, "experiments", "results", "decode.md")
    # The analysis below the marker is written by hand; a new run keeps it (update it by hand).
    notes = ""
    if os.path.exists(out) and NOTES_MARKER in open(out).read():
        notes = open(out).read().split(NOTES_MARKER, 1)[1]
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n\n" + NOTES_MARKER + notes)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
