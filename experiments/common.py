"""Helpers shared by the benchmark scripts: where the build is, timing, and the machine header."""
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.environ.get("HYBRIT_BUILD", os.path.join(ROOT, "build", "release"))
sys.path.insert(0, os.path.join(BUILD, "python"))
CLI = os.path.join(BUILD, "cli", "hybrit")
BENCH = os.path.join(BUILD, "experiments", "hybrit_bench")

import hybrit  # noqa: E402


def median_seconds(fn, repeats=7, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved_medians(fns, rounds=15, warmup=1):
    """Median seconds of each named function, timed in rounds that run every function once in a
    rotated order, so slow drift of a shared machine hits all of them alike."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times = {name: [] for name in names}
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(i + r) % len(names)]
            t = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def system_blas():
    """Which library Debian's libblas.so.3 alternative points to (numpy and python3-torch use it)."""
    target = os.path.realpath("/usr/lib/x86_64-linux-gnu/libblas.so.3")
    if "openblas" in target:
        return f"OpenBLAS ({target})"
    if "blis" in target:
        return f"BLIS ({target})"
    return f"the reference BLAS ({target}); `apt-get install libopenblas0-pthread` makes both much faster"


def machine_header(title, command):
    info = hybrit.info()
    gpus = ", ".join(d["name"] for d in info["cuda_devices"]) or "none (" + info["cuda_status"] + ")"
    return "\n".join([
        f"## {title}",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {info['cpu']}, {info['simd']}, {info['granted_cpus']} CPUs granted, "
        f"L3 {info['cache_bytes']['l3'] >> 20} MiB, {info['memory_bytes']['total'] >> 30} GiB; GPU: {gpus}",
        f"- system BLAS (numpy's and PyTorch's): {system_blas()}",
        f"- command: `{command}`",
        "",
    ])


def run_bench(filter_regex, env=None, repetitions=5):
    """One run of the Google Benchmark program; returns {name: median seconds per iteration}."""
    out = subprocess.run([BENCH, f"--benchmark_filter={filter_regex}", "--benchmark_format=json",
                          f"--benchmark_repetitions={repetitions}", "--benchmark_report_aggregates_only=true"],
                         capture_output=True, text=True, check=True, env=dict(os.environ, **(env or {})))
    data = json.loads(out.stdout)
    unit = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}
    return {b["run_name"].split("/min_time")[0].split("/real_time")[0]: b["real_time"] * unit[b["time_unit"]]
            for b in data["benchmarks"] if b.get("aggregate_name") == "median"}
