#!/usr/bin/python3
"""`hybrit serve` under load: 32 concurrent streaming clients on loopback, each sending requests
one after another (fortunes as prompts, temperature 0.8, max_tokens 64), against configs/small.yaml's
model (initial weights: speed does not depend on them). Reports time to first token and whole
request latency (p50, p99), tokens/s over all clients, and errors (goal: 0), beside one client
alone for scale.

Writes results/serve.md.   experiments/bench_serve.py [--clients 32] [--requests 4] [--tokens 64]
"""
import argparse
import http.client
import json
import os
import random
import re
import select
import signal
import subprocess
import tempfile
import threading
import time

import yaml

from common import CLI, ROOT, hybrit, machine_header


def fortunes(n, seed=0):
    texts = [t.strip() for t in hybrit.read_corpus(["/usr/share/games/fortunes"])["records"] if t.strip()]
    random.Random(seed).shuffle(texts)
    return [t[:48] for t in texts[:n]]


def one_request(port, prompt, tokens, seed):
    """(status, seconds to the first text, seconds to [DONE], completion tokens, error or None)."""
    t0 = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0.8, "seed": seed, "stream": True, "stream_options": {"include_usage": True}}
        c.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            return r.status, None, None, 0, r.read().decode()[:200]
        first = usage = None
        done = False
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if first is None and chunk["choices"]:  # text, or the end when the first token ends the record
                first = time.perf_counter() - t0
            if "usage" in chunk:
                usage = chunk["usage"]
        if not done or usage is None:
            return 200, first, None, 0, "the stream ended without [DONE] or usage"
        return 200, first, time.perf_counter() - t0, usage["completion_tokens"], None
    except Exception as e:  # noqa: BLE001 - every failure is counted, none stops the run
        return -1, None, None, 0, repr(e)
    finally:
        c.close()


def run_clients(port, prompts, clients, requests, tokens):
    results = []
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def client(k):
        start.wait()
        for j in range(requests):
            r = one_request(port, prompts[(k * requests + j) % len(prompts)], tokens, seed=k * 1000 + j)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return results, time.perf_counter() - t


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))] if values else float("nan")


def metrics(port):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    c.close()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(hybrit_[a-z_]+) (\S+)$", text, re.M)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=4, help="requests per client, one after another")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--max-running", type=int, default=16)
    args = ap.parse_args()

    cfg = yaml.safe_load(open(os.path.join(ROOT, "configs", "small.yaml")))
    cfg["train"] = dict(cfg.get("train", {}), batch=1, sample_tokens=0)
    path = os.path.join(tempfile.mkdtemp(prefix="bench-serve-"), "small.h5")
    hybrit.Trainer(cfg).save(path)
    server = subprocess.Popen([CLI, "serve", "--checkpoint", path, "--port", "0", "--max-running", str(args.max_running), "--max-waiting", "64"],
                              stdout=subprocess.PIPE, text=True)
    ready, _, _ = select.select([server.stdout], [], [], 120)
    listening = re.search(r":(\d+) ", server.stdout.readline()) if ready else None
    if not listening:
        server.kill()
        raise SystemExit("bench_serve: hybrit serve did not start listening within 120 s")
    port = int(listening.group(1))
    prompts = fortunes(args.clients * args.requests)
    try:
        one_request(port, "warm-up", 8, 0)
        alone, alone_s = run_clients(port, prompts, 1, 4, args.tokens)
        loaded, loaded_s = run_clients(port, prompts, args.clients, args.requests, args.tokens)
        m = metrics(port)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)

    def summary(name, results, seconds, clients):
        ok = [r for r in results if r[4] is None]
        errors = [r for r in results if r[4] is not None]
        ttft = [r[1] * 1000 for r in ok]
        latency = [r[2] * 1000 for r in ok]
        tokens = sum(r[3] for r in ok)
        row = (f"| {name} | {clients} | {len(results)} | {len(errors)} | {percentile(ttft, 50):.0f} | {percentile(ttft, 99):.0f} | "
               f"{percentile(latency, 50):.0f} | {percentile(latency, 99):.0f} | {tokens / seconds:.0f} |")
        print(row, flush=True)
        for e in errors[:5]:
            print("  error:", e, flush=True)
        return row, errors

    rows = ["| run | clients | requests | errors | TTFT p50 (ms) | TTFT p99 (ms) | latency p50 (ms) | latency p99 (ms) | tokens/s (all clients) |",
            "|---|---|---|---|---|---|---|---|---|"]
    row, _ = summary("one client alone", alone, alone_s, 1)
    rows.append(row)
    row, errors = summary(f"{args.clients} concurrent clients", loaded, loaded_s, args.clients)
    rows.append(row)
    lines = [machine_header("hybrit serve under load, configs/small.yaml's model",
                            f"experiments/bench_serve.py --clients {args.clients} --requests {args.requests} --tokens {args.tokens}"),
             f"Server: `hybrit serve --max-running {args.max_running} --max-waiting 64`, packed 2-bit weights, loopback. Each client streams "
             f"(SSE) {args.requests} requests one after another: a 48-character fortune as the prompt, max_tokens {args.tokens}, "
             "temperature 0.8. TTFT: request sent to the first event (text, or the end when the first token ends the record). Latency: request sent to `[DONE]`.", "", *rows, "",
             f"Errors under load: {len(errors)} (goal 0). Server counters after the run: {m.get('hybrit_preemptions_total', 0):.0f} preemptions, "
             f"{m.get('hybrit_engine_steps_total', 0):.0f} engine steps, prefix-cache hit rate {m.get('hybrit_prefix_cache_hit_rate', 0):.2f}."]
    with open(os.path.join(ROOT, "experiments", "results", "serve.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
