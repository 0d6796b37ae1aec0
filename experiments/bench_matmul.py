#!/usr/bin/python3
"""matmul f32 1024^3: hybrit's tbb backend against plain Eigen (built -O3 -march=native -fopenmp,
on all granted threads and on one) and numpy's BLAS, side by side in one run."""
import numpy as np

import time

from common import hybrit, machine_header, median_seconds, run_bench

N = 1024


def main():
    bench = run_bench(r"baseline/matmul_eigen_plain|op/matmul/1024x1024x1024/(c|tbb|auto)/")
    rng = np.random.default_rng(2)
    a = rng.standard_normal((N, N)).astype(np.float32)
    b = rng.standard_normal((N, N)).astype(np.float32)
    d = hybrit.Dispatcher(backend="tbb", use_environment=False)
    # Not interleaved call by call: OpenBLAS's threads busy-wait after each call and would steal
    # the cores from TBB's (and the other way round). Phases, with a pause to let them settle.
    t_tbb_py = median_seconds(lambda: d.matmul(a, b), repeats=9)
    time.sleep(0.5)
    t_numpy = median_seconds(lambda: a @ b, repeats=9)
    threads = hybrit.info()["granted_cpus"]
    flops = 2 * N ** 3
    rows = [
        (f"plain Eigen, {threads} threads (OpenMP)", bench[f"baseline/matmul_eigen_plain/1024/{threads}"]),
        ("plain Eigen, 1 thread", bench["baseline/matmul_eigen_plain/1024/1"]),
        (f"numpy {np.__version__} (its BLAS)", t_numpy),
        ("hybrit c (C++ benchmark)", bench["op/matmul/1024x1024x1024/c"]),
        ("hybrit tbb (C++ benchmark)", bench["op/matmul/1024x1024x1024/tbb"]),
        ("hybrit tbb (from Python)", t_tbb_py),
        ("hybrit auto (C++ benchmark)", bench["op/matmul/1024x1024x1024/auto"]),
    ]
    baseline = min(rows[0][1], rows[1][1], rows[2][1])
    print(machine_header("matmul f32, 1024 x 1024 x 1024", "/usr/bin/python3 experiments/bench_matmul.py"))
    print("| implementation | time | GFLOP/s | vs the fastest baseline |")
    print("|---|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {t * 1e3:.2f} ms | {flops / t / 1e9:.0f} | {baseline / t:.2f}x |")
    print(f"\nGoal: tbb at least 0.9x the faster of plain Eigen and numpy -> {baseline / rows[4][1]:.2f}x.")


if __name__ == "__main__":
    main()
