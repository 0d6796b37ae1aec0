"""Hostile input, the way a careless or hostile user supplies it: malformed configs, damaged
checkpoints, SIGKILLs during saves, hostile HTTP requests and bad Python calls. Every case is bad
by construction, so each must end in a clear one-line error (or, for HTTP, a 4xx answer); the
table counts what did not.

    PYTHONPATH=build/release/python /usr/bin/python3 experiments/hostile_inputs.py [--out experiments/results/hostile_inputs.md]

Outcomes:
  clear error      exit 1 with one "hybrit: error: ..." line (CLI), a 4xx JSON error (HTTP), a
                   Python exception of the documented kinds with a message (Python)
  accepted         the bad input was taken without a word (a silently accepted bad value)
  damaged accepted a damaged checkpoint whose content differs from the original was loaded
  internal error   exit 3, HTTP 500, or an exception of an undocumented kind
  crash            a signal (SIGSEGV, SIGABRT...), a dead server, a dead interpreter
  hang             no answer within the time limit
"""
import argparse
import collections
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import h5py
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.environ.get("HYBRIT_CLI", os.path.join(ROOT, "build", "release", "cli", "hybrit"))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
ENV = {k: v for k, v in os.environ.items() if not k.startswith("HYBRIT_")}
QUICK = ["--set", "train.steps=1", "--set", "train.sample_tokens=0", "--set", "train.eval_batches=1", "--set", "model.n_layers=1",
         "--set", "model.dim=32", "--set", "train.batch=2"]
HARMLESS = set()  # damaged copies whose content equals the original's: loading them is right
OUTCOMES = ["clear error", "accepted", "damaged accepted", "internal error", "crash", "hang"]


def run_cli(args, timeout=60):
    try:
        r = subprocess.run([CLI, *args], capture_output=True, text=True, env=ENV, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "hang", ""
    err = r.stderr.strip().splitlines()
    last = err[-1] if err else ""
    if r.returncode < 0 or r.returncode >= 128:
        return "crash", last
    if r.returncode == 3:
        return "internal error", last
    if r.returncode == 0:
        return "accepted", last
    errors = [line for line in err if line.startswith("hybrit: error:")]
    one_line = len(errors) <= 1 and (errors or r.returncode == 2) and all(len(e) <= 400 for e in errors)
    return ("clear error" if r.returncode in (1, 2) and one_line else "internal error"), last


# --------------------------------------------------------------------------- configs

def bad_configs(tmp):
    """(label, args) pairs: each names a bad config or override."""
    cases = []
    numbers = {
        "model.dim": ["0", "-4", "100000000000", "1e9", "big", "[1]", "64.5"],
        "model.n_layers": ["0", "1e9", "1000000000", "-1"],
        "model.n_heads": ["0", "3", "100000"],
        "model.n_kv_heads": ["-1", "3", "5000"],
        "model.context": ["0", "100000", "nan"],
        "model.rope_theta": ["0", "-1", ".inf", ".nan"],
        "model.norm_eps": ["0", "-1e-5", "2"],
        "model.ffn": ["gelu", "[swiglu]"], "model.quant": ["binary", "1"],
        "train.steps": ["0", "-1", "1e12", "99999999999999999999"],
        "train.batch": ["0", "100000000", "-2"],
        "train.grad_accum": ["0", "5", "-1"],
        "train.eval_batches": ["0", "1000000000"],
        "train.sample_tokens": ["-1", "100000000"],
        "train.sample_temperature": ["-1", ".nan", "1000"],
        "train.keep_checkpoints": ["0"], "train.recompute": ["all"], "train.on_nonfinite": ["ignore"],
        "optim.adamw.lr": ["-0.1", ".nan", "x"], "optim.muon.lr": ["-1"],
        "optim.muon.momentum": ["1.5", "-0.1"], "optim.muon.ns_steps": ["0", "4294967297", "2147483648", "1000000000"],
        "optim.adamw.beta1": ["1", "-0.5"], "optim.adamw.beta2": ["1.0", "2"], "optim.adamw.eps": ["-1e-8", "0"],
        "optim.adamw.weight_decay": ["-0.1"], "optim.grad_clip": ["-1"],
        "optim.schedule.min_lr_ratio": ["1.5", "-0.1"], "optim.schedule.decay_fraction": ["2", "-1"],
        "optim.schedule.kind": ["linear"], "optim.schedule.warmup_steps": ["-5"],
        "data.val_fraction": ["0", "1", "1.5"], "data.tokenizer": ["word"], "data.vocab_size": ["100", "100000"],
        "data.format": ["yaml"], "data.sources": ["''", "/dev/null", f"{tmp}/fifo", f"{tmp}/missing.txt", "[]"],
        "dispatch.backend": ["nonsense", "gpu"], "dispatch.threads": ["-1", "5000", "lots"], "dispatch.simd": ["avx9000"],
        "dispatch.ops.matmull": ["c"], "dispatch.ops.matmul": ["gpu"],
        "seed": ["-1", "x"],
    }
    for key, values in numbers.items():
        for v in values:
            cases.append((f"--set {key}={v}", [TINY, "--set", f"{key}={v}"]))
    for bad in ["model.=5", "=5", "steps", "model.dim.x=1", "train=5", "trian.steps=3", "model.layers=2"]:
        cases.append((f"--set {bad}", [TINY, "--set", bad]))
    files = {
        "duplicate section": "train:\n  steps: 1\ntrain:\n  batch: 2\n",
        "duplicate key": "train:\n  steps: 1\n  steps: 2\n",
        "second document": "train: {steps: 1}\n---\nmodel: {dim: 8}\n",
        "scalar root": "5\n", "list root": "- a\n- b\n", "string root": "hello\n",
        "non-scalar key": "dispatch:\n  [a]: 1\n", "map key": "{a: 1}: 2\n",
        "yaml-cpp hang": ", cosine k-means, a\n",
        "syntax error": "model: [\n", "tab indent": "model:\n\tdim: 4\n",
        "deep nesting": "model: " + "[" * 5000 + "]" * 5000 + "\n",
        "binary": "\x00\x01\x02\xff\xfe",
        "unknown section": "trian: {steps: 3}\n", "unknown key": "model: {layers: 2}\n",
        "anchor loop": "a: &x [*x]\n",
        "huge scalar": "train: {eval_every: " + "9" * 10000 + "}\n",
        "huge string": "train: {on_nonfinite: " + "x" * 1000000 + "}\n",
    }
    for label, text in files.items():
        path = os.path.join(tmp, label.replace(" ", "_") + ".yaml")
        with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(text)
        cases.append((label, [path]))
    cases += [("a FIFO as the config", [f"{tmp}/fifo"]), ("/dev/null as the config", ["/dev/null"]), ("a folder as the config", [tmp]),
              ("an empty config path", [""]), ("a missing config", [f"{tmp}/nope.yaml"])]
    return cases


def run_configs(tmp):
    os.mkfifo(f"{tmp}/fifo")
    rows = []
    for label, args in bad_configs(tmp):
        out = tempfile.mkdtemp(dir=tmp)
        outcome, line = run_cli(["train", *args[:1], "--out", out, *QUICK, *args[1:]], timeout=30)
        rows.append((label, outcome, line))
    # the global --backend and the environment
    for label, env, args in [("HYBRIT_BACKEND=gpu", {"HYBRIT_BACKEND": "gpu"}, []), ("HYBRIT_THREADS=5000", {"HYBRIT_THREADS": "5000"}, []),
                             ("--backend gpu", {}, ["--backend", "gpu"])]:
        r = subprocess.run([CLI, *args, "train", TINY, "--out", tempfile.mkdtemp(dir=tmp), *QUICK], capture_output=True, text=True,
                           env={**ENV, **env}, timeout=60)
        rows.append((label, "clear error" if r.returncode in (1, 2) else "accepted" if r.returncode == 0 else "internal error", r.stderr.strip()[-120:]))
    return rows


# --------------------------------------------------------------------------- checkpoints

def content(path):
    with h5py.File(path, "r") as f:
        attrs = {k: (v.tobytes() if isinstance(v, np.ndarray) else v) for k, v in f.attrs.items()}
        data = {}
        f.visititems(lambda name, obj: data.__setitem__(name, obj[...].tobytes()) if isinstance(obj, h5py.Dataset) else None)
    return attrs, data


def damaged_checkpoints(base, tmp, rng):
    """(label, path) pairs, each a damaged copy of `base`."""
    out = []
    size = os.path.getsize(base)
    with h5py.File(base, "r") as f:
        regions = []
        f.visititems(lambda n, o: regions.append((n, o.id.get_offset(), o.id.get_storage_size())) if isinstance(o, h5py.Dataset) and o.id.get_offset() else None)

    def copy(label):
        p = os.path.join(tmp, f"d{len(out)}.h5")
        shutil.copy(base, p)
        out.append((label, p))
        return p

    for i in range(30):  # one byte flipped inside a dataset's data
        name, off, n = regions[rng.integers(len(regions))]
        p = copy(f"byte flipped in {name}")
        data = bytearray(open(p, "rb").read())
        data[off + int(rng.integers(n))] ^= 1 << int(rng.integers(8))
        open(p, "wb").write(bytes(data))
    for i in range(30):  # one byte flipped anywhere (the B-tree, heaps, headers, free space)
        p = copy("byte flipped anywhere")
        data = bytearray(open(p, "rb").read())
        data[int(rng.integers(size))] ^= 1 << int(rng.integers(8))
        open(p, "wb").write(bytes(data))
    for frac in (0.0, 0.01, 0.1, 0.5, 0.9, 0.999):
        p = copy(f"truncated to {frac:.1%}")
        data = open(p, "rb").read()
        open(p, "wb").write(data[: int(len(data) * frac)])
    edits = {
        "step + 2^32": lambda f: f.attrs.__setitem__("step", np.int64(f.attrs["step"]) + (1 << 32)),
        "tokens_seen changed": lambda f: f.attrs.__setitem__("tokens_seen", np.int64(7)),
        "seed changed": lambda f: f.attrs.__setitem__("seed", np.uint64(99)),
        "config edited": lambda f: f.attrs.__setitem__("config", f.attrs["config"].replace("dim: 32", "dim: 33")),
        "config emptied": lambda f: f.attrs.__setitem__("config", ""),
        "tokenizer edited": lambda f: f.attrs.__setitem__("tokenizer", f.attrs["tokenizer"].replace("257", "300")),
        "tokenizer not JSON": lambda f: f.attrs.__setitem__("tokenizer", "{"),
        "format changed": lambda f: f.attrs.__setitem__("format", "hybrit-inference"),
        "version 99": lambda f: f.attrs.__setitem__("format_version", 99),
        "meta checksum deleted": lambda f: f.attrs.__delitem__("meta_fnv1a64") if "meta_fnv1a64" in f.attrs else None,
        "params deleted": lambda f: f.__delitem__("params"),
        "optim deleted": lambda f: f.__delitem__("optim"),
        "one dataset deleted": lambda f: f.__delitem__("optim/muon_momentum/blocks.0.w_up"),
        "extra dataset": lambda f: f.create_dataset("params/extra", data=np.zeros(3, np.float32)),
        "dataset reshaped": lambda f: (f.__delitem__("params/final_norm"), f.create_dataset("params/final_norm", data=np.zeros(64, np.float32))),
        "dataset checksum changed": lambda f: f["params/tok_emb"].attrs.__setitem__("fnv1a64", np.uint64(1)),
        "dataset checksum deleted": lambda f: f["params/tok_emb"].attrs.__delitem__("fnv1a64"),
        "dataset as int": lambda f: (f.__delitem__("params/final_norm"), f.create_dataset("params/final_norm", data=np.zeros(32, np.int32))),
    }
    for label, edit in edits.items():
        p = copy(label)
        with h5py.File(p, "r+") as f:
            edit(f)
    return out


def run_checkpoints(tmp, rng):
    run = os.path.join(tmp, "ckrun")
    subprocess.run([CLI, "train", TINY, "--out", run, *QUICK, "--set", "train.steps=2"], check=True, capture_output=True, env=ENV, timeout=300)
    base = os.path.join(run, "ckpt-00000002.h5")
    original = content(base)
    rows = []
    for label, path in damaged_checkpoints(base, tmp, rng):
        try:
            changed = content(path) != original
        except Exception:
            changed = True  # h5py cannot read it either
        outcomes = []
        for args in (["checkpoint", "inspect", path], ["generate", "--checkpoint", path, "--prompt", "a", "--max-tokens", "2"],
                     ["train", TINY, "--out", tempfile.mkdtemp(dir=tmp), *QUICK, "--set", "train.steps=3", "--resume", path]):
            outcome, line = run_cli(args, timeout=60)
            if outcome == "accepted":
                if not changed:  # the flip hit bytes no reader uses (free space, padding): nothing was damaged
                    HARMLESS.add(label + " " + path)
                outcome = "damaged accepted" if changed else "clear error"
            outcomes.append((outcome, line))
        worst = max(outcomes, key=lambda o: OUTCOMES.index(o[0]))
        rows.append((label, worst[0], worst[1]))
    return rows


def run_sigkills(tmp, kills, rng):
    run = os.path.join(tmp, "killrun")
    args = [CLI, "train", TINY, "--out", run, "--set", "model.dim=256", "--set", "model.n_layers=6", "--set", "model.n_heads=8", "--set", "train.batch=1",
            "--set", "train.steps=100000", "--set", "train.checkpoint_every=1", "--set", "train.keep_checkpoints=2", "--set", "train.sample_tokens=0",
            "--set", "train.eval_every=0"]
    rows = []
    for attempt in range(kills):
        before = set(os.listdir(run)) if os.path.isdir(run) else set()
        p = subprocess.Popen(args + (["--resume", "auto"] if attempt else []), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
        deadline = time.monotonic() + 300
        while p.poll() is None and time.monotonic() < deadline and not {n for n in (os.listdir(run) if os.path.isdir(run) else []) if n.endswith(".h5")} - before:
            time.sleep(0.02)
        time.sleep(float(rng.uniform(0, 0.5)))
        p.send_signal(signal.SIGKILL)
        p.wait()
        bad = []
        for name in sorted(os.listdir(run)):
            if name.startswith("ckpt-") and name.endswith(".h5"):
                outcome, line = run_cli(["checkpoint", "inspect", os.path.join(run, name)])
                if outcome != "accepted":
                    bad.append(f"{name}: {line}")
        rows.append((f"SIGKILL {attempt + 1} during saves", "clear error" if not bad else "damaged accepted", "; ".join(bad) or "every checkpoint left loads"))
    return rows


# --------------------------------------------------------------------------- HTTP

def http_cases():
    deep = lambda field: '{"prompt": "a", "%s": %s1%s}' % (field, "[" * 100000, "]" * 100000)
    cases = [(f"100k-deep {f}", "POST", "/v1/completions", deep(f)) for f in ("temperature", "seed", "stop", "n", "max_tokens", "user")]
    cases.append(("100k-deep prompt", "POST", "/v1/completions", '{"prompt": %s1%s}' % ("[" * 100000, "]" * 100000)))
    valid = {("temperature", "0"), ("temperature", "1e20"), ("seed", "-1"), ("seed", "0"), ("top_k", "0"), ("min_p", "0"), ("repetition_penalty", "1e20")}
    for field in ("temperature", "top_p", "max_tokens", "seed", "top_k", "min_p", "repetition_penalty"):
        for value in ("1e400", "-1e400", '"x"', "[1]", "{}", "true", "-1", "1e20", "0"):
            if (field, value) not in valid:  # only bad values are sent
                cases.append((f"{field}={value}", "POST", "/v1/completions", '{"prompt": "a", "max_tokens": 2, "%s": %s}' % (field, value)))
    for value in ("5", "[1]", "{}", "true"):
        cases.append((f"user={value}", "POST", "/v1/completions", '{"prompt": "a", "user": %s}' % value))
        cases.append((f"model={value}", "POST", "/v1/completions", '{"prompt": "a", "model": %s}' % value))
    for messages in ("[]", "null", '"hi"', "[1]", '[{"role": "robot", "content": "a"}]', '[{"role": "user", "content": 5}]',
                     '[{"role": "user", "content": [{"type": "image_url"}]}]', '[{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]',
                     "[" + ",".join(['{"role": "user", "content": "a"}'] * 3) + "]] "):
        cases.append((f"chat messages={messages[:24]}", "POST", "/v1/chat/completions", '{"messages": %s, "max_tokens": 2}' % messages))
    for prompt in ('""', "[]", "[-1]", "[300]", "[1.5]", "[[]]", '[["a"]]', "5", "null"):
        cases.append((f"prompt={prompt[:20]}", "POST", "/v1/completions", '{"prompt": %s, "max_tokens": 2}' % prompt))
    for body in ("", "{", "[1, 2]", "null", '"a"', "\xff\xfe", '{"prompt": "a",}', '{"prompt": "a"} trailing', '{"prompt": "\\ud800"}',
                 '{"prompt": "a", "stream": "yes"}', '{"prompt": "a", "stream_options": {"include_usage": true}}', '{"prompt": "a", "n": 2}',
                 '{"prompt": "a", "stop": [""]}', '{"prompt": "a", "stop": ' + json.dumps(["x"] * 20) + "}", '{"prompt": "a", "x" : 1}',
                 '{"' + "k" * 100000 + '": 1}'):
        cases.append((f"body {body[:20]!r}", "POST", "/v1/completions", body))
    for method in ("GET", "PUT", "DELETE", "PATCH"):
        cases.append((f"{method} /v1/completions", method, "/v1/completions", "{}"))
    cases += [("POST /health", "POST", "/health", "{}"), ("POST /metrics", "POST", "/metrics", "{}"), ("GET /nothing", "GET", "/nothing", None),
              ("9 MiB body", "POST", "/v1/completions", '{"prompt": "' + "a" * (9 << 20) + '"}')]
    return cases


def run_http(tmp, checkpoint):
    def start():
        p = subprocess.Popen([CLI, "serve", "--checkpoint", checkpoint, "--port", "0", "--max-running", "2", "--max-waiting", "2"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV)
        line = p.stdout.readline()
        return p, int(line.split("127.0.0.1:")[1].split()[0])
    server, port = start()
    rows = []

    def ask(method, path, body, timeout=30):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            c.request(method, path, body=body.encode("utf-8", errors="surrogateescape") if body is not None else None,
                      headers={"Content-Type": "application/json"})
            r = c.getresponse()
            payload = r.read()
            return r.status, payload
        finally:
            c.close()

    for label, method, path, body in http_cases():
        try:
            status, payload = ask(method, path, body)
            outcome = "clear error" if 400 <= status < 500 and status != 404 or (status == 404 and path == "/nothing") else \
                "internal error" if status >= 500 else "accepted"
            rows.append((label, outcome, f"HTTP {status} {payload[:100]!r}"))
        except socket.timeout:
            rows.append((label, "hang", "no answer in 30 s"))
        except (ConnectionError, http.client.HTTPException) as e:
            try:
                server.wait(timeout=5)  # a server that is dying has not always exited yet
            except subprocess.TimeoutExpired:
                pass
            rows.append((label, "crash" if server.poll() is not None else "internal error", repr(e)))
        if server.poll() is not None:  # counted as that case's crash; a fresh server for the rest
            rows[-1] = (label, "crash", f"the server died with {server.returncode}")
            server, port = start()
    # a burst of 150 streaming clients against 2 running + 2 waiting slots
    statuses, failures = collections.Counter(), []

    def client():
        try:
            status, _ = ask("POST", "/v1/completions", json.dumps({"prompt": "The ", "max_tokens": 50, "stream": True}), timeout=120)
            statuses[status] += 1
        except Exception as e:
            failures.append(repr(e))
    threads = [threading.Thread(target=client) for _ in range(150)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows.append(("150 streams at once", "clear error" if not failures and set(statuses) <= {200, 429} else "crash",
                 f"{dict(statuses)}; {len(failures)} resets or errors"))
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=60)
        rows.append(("SIGTERM", "clear error" if server.returncode == 0 else "internal error", f"exit {server.returncode}"))
    except subprocess.TimeoutExpired:
        server.kill()
        rows.append(("SIGTERM", "hang", "the server did not stop"))
    return rows


# --------------------------------------------------------------------------- Python

# Each case runs in an interpreter of its own (a crash or hang is then that case's alone), after
# this prelude: d, x, and a checkpoint at CKPT with its Trainer t and Generator g made on demand.
PYTHON_PRELUDE = r"""
import json, sys, hybrit, numpy as np
d = hybrit.Dispatcher(use_environment=False)
x = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
class Lazy:
    def __getattr__(self, name):
        return getattr(self.make(), name)
def trainer():
    t = hybrit.Trainer({"model": {"dim": 32, "n_layers": 1, "n_heads": 2, "context": 32}, "train": {"batch": 2, "sample_tokens": 0}})
    return t
t = type("T", (Lazy,), {"make": staticmethod(trainer)})()
g = type("G", (Lazy,), {"make": staticmethod(lambda: hybrit.Generator("CKPT"))})()
try:
    (CASE)
    print("RESULT " + json.dumps(["accepted", ""]))
except (ValueError, TypeError, OSError, RuntimeError, MemoryError) as e:
    print("RESULT " + json.dumps(["clear error" if str(e) and "Unable to cast" not in str(e) else "internal error", f"{type(e).__name__}: {str(e)[:100]}"]))
except Exception as e:
    print("RESULT " + json.dumps(["internal error", f"{type(e).__name__}: {str(e)[:100]}"]))
"""

PYTHON_CASES = {
    "Dispatcher(threads=10**6)": "hybrit.Dispatcher(threads=10**6)",
    "Dispatcher(threads=-1)": "hybrit.Dispatcher(threads=-1)",
    "Dispatcher(backend='gpu')": "hybrit.Dispatcher(backend='gpu')",
    "Dispatcher(simd='avx9000')": "hybrit.Dispatcher(simd='avx9000')",
    "Dispatcher(ops={'gemm': 'c'})": "hybrit.Dispatcher(ops={'gemm': 'c'})",
    "choose negative dims": "d.choose('matmul', [-5, 3, 3])",
    "choose no dims": "d.choose('matmul', [])",
    "choose bad op": "d.choose('conv', [1])",
    "quantize float64": "d.quantize_ternary(np.zeros(4))",
    "quantize NaN": "d.quantize_ternary(np.array([1, np.nan], np.float32))",
    "quantize non-contiguous": "d.quantize_ternary(np.zeros((4, 4), np.float32)[:, 1])",
    "matmul shape mismatch": "d.matmul(np.zeros((2, 3), np.float32), np.zeros((4, 5), np.float32))",
    "matmul_ternary code 0b11": "d.matmul_ternary(np.ones((2, 8), np.int8), np.ones(2, np.float32), np.full((3, 2), 0xFF, np.uint8), 1.0)",
    "matmul_ternary zero scale": "d.matmul_ternary(np.ones((2, 8), np.int8), np.zeros(2, np.float32), np.full((3, 2), 0x55, np.uint8), 1.0)",
    "matmul_ternary NaN w_scale": "d.matmul_ternary(np.ones((2, 8), np.int8), np.ones(2, np.float32), np.full((3, 2), 0x55, np.uint8), float('nan'))",
    "unpack wrong cols": "d.unpack_ternary(np.zeros((2, 2), np.uint8), 100)",
    "kmeans k > n": "hybrit.kmeans(x, 60)",
    "kmeans k=0": "hybrit.kmeans(x, 0)",
    "kmeans NaN point": "hybrit.kmeans(np.full((5, 2), np.nan, np.float32), 2)",
    "kmeans max_points_per_centroid=-1": "hybrit.kmeans(x, 4, max_points_per_centroid=-1)",
    "kmeans max_points_per_centroid=2**62 (valid: no sampling)": "hybrit.kmeans(x, 4, max_points_per_centroid=2**62); raise ValueError('ran, as it should')",
    "select report_eps=nan": "hybrit.select(x, strategy='nearest', fraction=0.5, k=3, report_eps=float('nan'))",
    "select fraction=2": "hybrit.select(x, strategy='nearest', fraction=2.0, k=3)",
    "select strategy=best": "hybrit.select(x, strategy='best', fraction=0.5, k=3)",
    "Model dim='big'": "hybrit.Model({'dim': 'big'})",
    "Model n_layers=10**6": "hybrit.Model({'n_layers': 10**6})",
    "Model dim=10**12": "hybrit.Model({'dim': 10**12})",
    "Model unknown key": "hybrit.Model({'layers': 2})",
    "Model object value": "hybrit.Model({'dim': object()})",
    "Trainer config not a dict": "hybrit.Trainer(5)",
    "Trainer missing file": "hybrit.Trainer('/nonexistent.yaml')",
    "Trainer lr=-1": "hybrit.Trainer({'optim': {'adamw': {'lr': -1}}})",
    "Trainer batch=10**8": "hybrit.Trainer({'train': {'batch': 10**8}})",
    "read_corpus /dev/null": "hybrit.read_corpus(['/dev/null'])",
    "read_corpus missing": "hybrit.read_corpus(['/nonexistent'])",
    "load_checkpoint missing": "hybrit.load_checkpoint('/nonexistent.h5')",
    "load_checkpoint not HDF5": "hybrit.load_checkpoint('/etc/hostname')",
    "Generator missing": "hybrit.Generator('/nonexistent.h5')",
    "Trainer.sample(-5)": "t.sample(-5)",
    "Trainer.sample(temperature=-1)": "t.sample(5, temperature=-1)",
    "Trainer.sample(temperature=nan)": "t.sample(5, temperature=float('nan'))",
    "Trainer.restore(missing)": "t.restore('/nonexistent.h5')",
    "Generator temperature=-1": "g.generate('a', max_tokens=2, temperature=-1)",
    "Generator temperature=nan": "g.generate('a', max_tokens=2, temperature=float('nan'))",
    "Generator top_p=0": "g.generate('a', top_p=0)",
    "Generator max_tokens=0": "g.generate('a', max_tokens=0)",
    "Generator float token ids": "g.generate([[65.7, 66]], max_tokens=2)",
    "Generator token 300": "g.generate([[300]], max_tokens=2)",
    "Generator negative token": "g.generate([[-1]], max_tokens=2)",
    "Generator empty prompt": "g.generate('', max_tokens=2)",
    "Generator.decode([300])": "hybrit.Generator('CKPT')._g.decode([300]) if not hasattr(hybrit.Generator, 'decode') else g.decode([300])",
    "Generator.decode([-1])": "hybrit.Generator('CKPT')._g.decode([-1]) if not hasattr(hybrit.Generator, 'decode') else g.decode([-1])",
    "Generator stop=['']": "g.generate('a', stop=[''])",
    "two interleaved streams": "a = g.stream('The ', max_tokens=20, temperature=0); b = g.stream('A ', max_tokens=20, temperature=0); "
                               "ra = [next(a), next(b)]; rest = list(a) + list(b); raise ValueError('ran both streams')",
}


def run_python(tmp):
    ckpt = os.path.join(tmp, "py.h5")
    env = {**ENV, "PYTHONPATH": os.environ.get("PYTHONPATH", os.path.join(ROOT, "build", "release", "python"))}
    subprocess.run([sys.executable, "-c", "import hybrit; t = hybrit.Trainer({'model': {'dim': 32, 'n_layers': 1, 'n_heads': 2, 'context': 32}, "
                    f"'train': {{'batch': 2, 'sample_tokens': 0}}}}); t.save({ckpt!r})"], check=True, env=env, timeout=300)
    rows = []
    for name, case in PYTHON_CASES.items():
        code = PYTHON_PRELUDE.replace("CKPT", ckpt).replace("(CASE)", case.replace("CKPT", ckpt))
        try:
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
        except subprocess.TimeoutExpired:
            rows.append((name, "hang", "no result in 60 s"))
            continue
        found = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
        if r.returncode != 0 or not found:
            rows.append((name, "crash", f"the interpreter died ({r.returncode}): {r.stderr.strip()[-150:]}"))
        else:
            outcome, line = json.loads(found[0][7:])
            rows.append((name, outcome, line))
    return rows


# --------------------------------------------------------------------------- report

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "experiments", "results", "hostile_inputs.md"))
    ap.add_argument("--kills", type=int, default=10, help="SIGKILLs during checkpoint saves (default 10)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    tmp = tempfile.mkdtemp(prefix="hybrit-hostile-")
    sections = {}
    try:
        t = time.monotonic()
        sections["configs and overrides"] = run_configs(tmp)
        sections["damaged checkpoints"] = run_checkpoints(tmp, rng)
        sections["SIGKILL during saves"] = run_sigkills(tmp, args.kills, rng)
        sections["HTTP requests"] = run_http(tmp, os.path.join(tmp, "ckrun", "ckpt-00000002.h5"))
        sections["Python calls"] = run_python(tmp)
        seconds = time.monotonic() - t
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    lines = ["# Hostile input", "", f"`experiments/hostile_inputs.py` (seed {args.seed}), {time.strftime('%Y-%m-%d')}, {seconds:.0f} s. "
             "Every case is bad by construction; the goal is a clear error for each.", "",
             "| what | cases | " + " | ".join(OUTCOMES) + " |", "|---|---|" + "---|" * len(OUTCOMES)]
    total = collections.Counter()
    for name, rows in sections.items():
        counts = collections.Counter(outcome for _, outcome, _ in rows)
        total.update(counts)
        lines.append(f"| {name} | {len(rows)} | " + " | ".join(str(counts[o]) for o in OUTCOMES) + " |")
    lines.append(f"| **all** | {sum(total.values())} | " + " | ".join(f"**{total[o]}**" for o in OUTCOMES) + " |")
    lines += ["", f"Of the damaged checkpoints, {len(HARMLESS)} had a byte flipped where no reader looks (h5py reads the same "
              "attributes and datasets as from the original); they load, and are counted as handled.", ""]
    lines += ["Cases that did not end in a clear error:", ""]
    bad = [(name, label, outcome, line) for name, rows in sections.items() for label, outcome, line in rows if outcome != "clear error"]
    lines += [f"- {name}: `{label}`: {outcome}: {line}" for name, label, outcome, line in bad] or ["- none"]
    lines += ["", "A sample of the clear errors (the first of each section):", ""]
    for name, rows in sections.items():
        for label, outcome, line in rows[:3]:
            if outcome == "clear error":
                lines.append(f"- {name}: `{label}` -> {line}")
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
