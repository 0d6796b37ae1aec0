#!/usr/bin/python3
"""quantize_ternary on 16M floats: hybrit's backends against numpy's version of the same formula,
side by side in one run, and against the memory bandwidth that dispatch-report measures.

Bytes counted: the op reads w twice (sum |w|, then quantize) and writes q once: 9 bytes per weight.
The minimum any implementation needs is 5 (one read, one write); both rates are shown.
"""
import numpy as np

from common import hybrit, machine_header, median_seconds

N = 1 << 24


def numpy_ternary(w):
    s = max(np.abs(w).mean(dtype=np.float64), 1e-5)
    return np.clip(np.round(w / np.float32(s)), -1, 1).astype(np.int8), s


def main():
    rng = np.random.default_rng(1)
    w = (rng.standard_normal(N) * 0.02).astype(np.float32)
    ceilings = hybrit.dispatch_report(quick=True, ops=["quantize_ternary"])["ceilings"]
    bandwidth = ceilings["memory_gbps"]
    q_np, s_np = numpy_ternary(w)
    t_np = median_seconds(lambda: numpy_ternary(w), repeats=5)
    rows = []
    out = np.empty(N, dtype=np.int8)
    for mode in ["c", "tbb", None]:
        d = hybrit.Dispatcher(backend=mode, use_environment=False)
        q, s = d.quantize_ternary(w)
        assert np.array_equal(q, np.clip(np.round(w / np.float32(s)), -1, 1).astype(np.int8))
        rows.append((f"{mode or 'auto'}, new output array", median_seconds(lambda: d.quantize_ternary(w), repeats=15)))
        rows.append((f"{mode or 'auto'}, out= reused", median_seconds(lambda: d.quantize_ternary(w, out=out), repeats=15)))
    print(machine_header("quantize_ternary, 16M floats (64 MiB)", "/usr/bin/python3 experiments/bench_quantize.py"))
    print(f"Measured ceiling (dispatch-report): {bandwidth:.1f} GB/s "
          f"(read {ceilings['read_gbps']:.1f}, copy {ceilings['copy_gbps']:.1f}).\n")
    print("| implementation | time | GB/s (9 B/weight) | share of ceiling | GB/s (5 B/weight) | speed-up over numpy |")
    print("|---|---|---|---|---|---|")
    print(f"| numpy (same formula) | {t_np * 1e3:.1f} ms | {9 * N / t_np / 1e9:.1f} | {9 * N / t_np / 1e9 / bandwidth:.0%} | {5 * N / t_np / 1e9:.1f} | 1.0x |")
    for name, t in rows:
        print(f"| hybrit {name} | {t * 1e3:.2f} ms | {9 * N / t / 1e9:.1f} | {9 * N / t / 1e9 / bandwidth:.0%} | {5 * N / t / 1e9:.1f} | {t_np / t:.1f}x |")
    best = min(t for _, t in rows)
    print(f"\nGoals: at least 70% of the ceiling -> {9 * N / best / 1e9 / bandwidth:.0%}; at least 20x numpy -> {t_np / best:.1f}x.")
    print("16M floats are 64 MiB against a 32 MiB L3, so part of the second read can come from cache: "
          "a share above 100% of the DRAM ceiling is that, not a measuring error. Far past the cache:\n")
    big = (rng.standard_normal(4 * N) * 0.02).astype(np.float32)
    big_out = np.empty(4 * N, dtype=np.int8)
    print("| 64M floats (256 MiB) | time | GB/s (9 B/weight) | share of ceiling | GB/s (5 B/weight) |")
    print("|---|---|---|---|---|")
    for mode in ["c", "tbb"]:
        d = hybrit.Dispatcher(backend=mode, use_environment=False)
        for label, fn in [("new output array", lambda: d.quantize_ternary(big)), ("out= reused", lambda: d.quantize_ternary(big, out=big_out))]:
            t = median_seconds(fn, repeats=7)
            print(f"| hybrit {mode}, {label} | {t * 1e3:.1f} ms | {36 * N / t / 1e9:.1f} | {36 * N / t / 1e9 / bandwidth:.0%} | {20 * N / t / 1e9:.1f} |")
    print("\nA new output array costs a page fault per 4 KiB page on first touch; passing out= avoids it.")


if __name__ == "__main__":
    main()
