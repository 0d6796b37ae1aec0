"""Decode speed side by side with llama.cpp, on one model file: hybrit's engine reading the GGUF
hybrit exported (packed 2-bit weights) against llama.cpp's llama-bench / llama-batched-bench on the
same file (TQ2_0), both on 2 threads, rounds interleaved (medians, min-max).

  prompt processing   a 512-token prompt (distinct in every round: hybrit's prefix cache must not
                      help), tokens/s of the prefill (hybrit: max_tokens 1; llama-bench: pp512)
  decode, batch 1     128 new tokens after a short prompt (hybrit; llama-bench: tg128)
  decode, batch 8     8 sequences of 128 new tokens at once, tokens/s of all of them (hybrit: 8
                      prompts in one generate call; llama-batched-bench: S_TG at 8 parallel)

The weights are a freshly initialised model of the shape (speed does not depend on their values).
Shapes: small (configs/small.yaml with SubLN and a tied head, the bitnet graph llama.cpp has; FFN
768 so every row is whole TQ2_0 blocks, context 1024) and 595m (dim 1536, 24 layers, 16 heads, 4 KV
heads, FFN 4096, context 2048: about 595M parameters).

  /usr/bin/python3 experiments/bench_decode_llama.py --llama LLAMA_DIR [--shape small|595m] [--rounds 3]

Writes experiments/results/decode_vs_llama_<shape>.md.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CLI, ROOT, hybrit, machine_header  # noqa: E402

SHAPES = {
    "small": {"dim": 256, "n_layers": 6, "n_heads": 8, "n_kv_heads": 4, "ffn_hidden": 768, "context": 1024},
    "595m": {"dim": 1536, "n_layers": 24, "n_heads": 16, "n_kv_heads": 4, "ffn_hidden": 4096, "context": 2048},
}
WORDS = open("/usr/share/common-licenses/GPL-3").read().split()


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{r.stderr[-3000:]}")
    return r.stdout


def prompt_of(tokens, salt):
    # Distinct text per call, `tokens` bytes long (byte tokenizer: a byte is a token).
    words = WORDS[salt * 37 % len(WORDS):] + WORDS
    text = f"{salt} " + " ".join(words)
    return text[:tokens]


def hybrit_round(gen, salt):
    out = {}
    p = prompt_of(512, salt)
    t = time.perf_counter()
    gen.generate([p], max_tokens=1, temperature=1.0, seed=salt)
    out["pp512"] = 512 / (time.perf_counter() - t)
    for batch, key in ((1, "tg128"), (8, "tg128 x8")):
        prompts = [prompt_of(16, salt * 100 + i) for i in range(batch)]
        t = time.perf_counter()
        res = gen.generate(prompts, max_tokens=128, temperature=1.0, seed=salt, stop=None)
        out[key] = sum(len(r["tokens"]) for r in res) / (time.perf_counter() - t)
    return out


def llama_round(llama, gguf):
    out = {}
    bench = json.loads(run([os.path.join(llama, "build", "bin", "llama-bench"), "-m", gguf, "-p", "512", "-n", "128", "-t", "2", "-r", "1", "-o", "json"]))
    for row in bench:
        out["pp512" if row["n_prompt"] else "tg128"] = row["avg_ts"]
    text = run([os.path.join(llama, "build", "bin", "llama-batched-bench"), "-m", gguf, "-c", "2048", "-b", "512", "-ub", "512",
                "-npp", "16", "-ntg", "128", "-npl", "8", "-t", "2"])
    # | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
    row = next(line for line in text.splitlines() if re.match(r"\|\s+16\s+\|\s+128\s+\|\s+8\s+\|", line))
    out["tg128 x8"] = float(row.split("|")[8])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama", required=True, help="a llama.cpp tree with llama-bench and llama-batched-bench built in build/bin")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--llama-rev", default="")
    a = ap.parse_args()
    shape = SHAPES[a.shape]
    work = tempfile.mkdtemp(prefix="bench-decode-llama-")
    cfg = {"model": dict(shape, subln=True, tied_embeddings=True), "train": {"batch": 1, "sample_tokens": 0}, "seed": 1}
    trainer = hybrit.Trainer(cfg)
    ckpt = os.path.join(work, "model.h5")
    trainer.save(ckpt)
    del trainer
    gguf = os.path.join(work, "model.gguf")
    run([CLI, "checkpoint", "export", ckpt, "-o", gguf])
    gen = hybrit.Generator(gguf, max_running=8)
    info = gen.info
    hybrit_round(gen, 999)  # warm-up: page in the weights, size the KV pool
    results = {"hybrit": {}, "llama.cpp": {}}
    for r in range(a.rounds):
        order = [("hybrit", lambda: hybrit_round(gen, r + 1)), ("llama.cpp", lambda: llama_round(a.llama, gguf))]
        if r % 2:
            order.reverse()
        for name, fn in order:
            for k, v in fn().items():
                results[name].setdefault(k, []).append(v)
            print(name, {k: round(v[-1], 1) for k, v in results[name].items()}, flush=True)
    lines = [machine_header(f"Decode speed against llama.cpp, {a.shape} shape", f"/usr/bin/python3 experiments/bench_decode_llama.py --llama LLAMA_DIR --shape {a.shape} --rounds {a.rounds}"),
             "", f"- llama.cpp: {a.llama_rev or 'revision not given'}, CPU build (GGML_NATIVE), 2 threads",
             f"- model: {shape}, SubLN, tied head, ternary; GGUF {os.path.getsize(gguf) / 2**20:.1f} MiB (TQ2_0); hybrit's packed weights {info['weight_bytes'] / 2**20:.1f} MiB",
             f"- {a.rounds} rounds, interleaved (the order alternates); median (min-max) tokens/s", "",
             "| | hybrit (packed 2-bit, reading the GGUF) | llama.cpp TQ2_0 | hybrit / llama.cpp |", "|---|---|---|---|"]
    names = {"pp512": "prompt processing (512 tokens)", "tg128": "decode, batch 1", "tg128 x8": "decode, batch 8 (all sequences)"}
    for key, label in names.items():
        h, l_ = results["hybrit"][key], results["llama.cpp"][key]
        lines.append(f"| {label} | {statistics.median(h):,.1f} ({min(h):,.1f}-{max(h):,.1f}) | {statistics.median(l_):,.1f} ({min(l_):,.1f}-{max(l_):,.1f}) | "
                     f"{statistics.median(h) / statistics.median(l_):.2f}x |")
    # The goals are also stated against the machine: batch-1 decode as a share of the
    # streaming read bandwidth (dispatch-report's ceiling, measured here over a buffer far past the
    # caches), and batch 8 and prompt processing as multiples of batch 1.
    report = json.loads(run([CLI, "dispatch-report", "--quick", "--json", "--ops", "quantize_ternary"]))
    read_gbps = report["ceilings"]["read_gbps"]
    h = {k: statistics.median(v) for k, v in results["hybrit"].items()}
    decode_gbps = h["tg128"] * info["weight_bytes"] / 1e9
    lines += ["", f"- hybrit batch 1 reads its packed weights once per token: {decode_gbps:.1f} GB/s, "
              f"{100 * decode_gbps / read_gbps:.0f}% of this machine's streaming read bandwidth ({read_gbps:.1f} GB/s, `hybrit dispatch-report`'s ceiling)",
              f"- hybrit batch 8 = {h['tg128 x8'] / h['tg128']:.1f}x batch 1; prompt processing = {h['pp512'] / h['tg128']:.1f}x batch 1"]
    out = os.path.join(ROOT, "experiments", "results", f"decode_vs_llama_{a.shape}.md")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
