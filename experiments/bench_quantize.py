#!/usr/bin/python3
"""quantize_ternary on 16M floats: hybrit's backends against numpy's version of the same formula,
side by side in one run, and against the memory bandwidth that dispatch-report measures.

Bytes counted: the op reads w twice (sum |w|, then quantize) and writes q once: 9 bytes per weight.
The minimum any implementation needs is 5 (one read, one write); both rates are shown.
"""
import numpy as np

from common import hybrit, interleaved_medians, machine_header

N = 1 << 24


def numpy_ternary(w):
    s = max(np.abs(w).mean(dtype=np.float64), 1e-5)
    return np.clip(np.round(w / np.float32(s)), -1, 1).astype(np.int8), s


def ceiling():
    return hybrit.dispatch_report(quick=True, ops=["quantize_ternary"])["ceilings"]


def main():
    rng = np.random.default_rng(1)
    w = (rng.standard_normal(N) * 0.02).astype(np.float32)
    ceilings = [ceiling()]
    out = np.empty(N, dtype=np.int8)
    fns = {"numpy (same formula)": lambda: numpy_ternary(w)}
    for mode in ["c", "tbb", None]:
        d = hybrit.Dispatcher(backend=mode, use_environment=False)
        q, s = d.quantize_ternary(w)
        assert np.array_equal(q, np.clip(np.round(w / np.float32(s)), -1, 1).astype(np.int8))
        fns[f"hybrit {mode or 'auto'}, new output array"] = lambda d=d: d.quantize_ternary(w)
        fns[f"hybrit {mode or 'auto'}, out= reused"] = lambda d=d: d.quantize_ternary(w, out=out)
    t = interleaved_medians(fns, rounds=21)
    ceilings.append(ceiling())

    big = (rng.standard_normal(4 * N) * 0.02).astype(np.float32)
    big_out = np.empty(4 * N, dtype=np.int8)
    big_fns = {}
    for mode in ["c", "tbb"]:
        d = hybrit.Dispatcher(backend=mode, use_environment=False)
        big_fns[f"hybrit {mode}, new output array"] = lambda d=d: d.quantize_ternary(big)
        big_fns[f"hybrit {mode}, out= reused"] = lambda d=d: d.quantize_ternary(big, out=big_out)
    t_big = interleaved_medians(big_fns, rounds=9)
    ceilings.append(ceiling())
    best_ceiling = max(ceilings, key=lambda c: c["memory_gbps"])
    bw = best_ceiling["memory_gbps"]

    print(machine_header("quantize_ternary, 16M floats (64 MiB)", "/usr/bin/python3 experiments/bench_quantize.py"))
    print(f"Ceiling: {bw:.1f} GB/s, the best of three dispatch-report measurements across this run "
          f"({', '.join(format(c['memory_gbps'], '.1f') for c in ceilings)}). "
          "Implementations interleaved over 21 rounds, medians.\n")
    print("| implementation | time | GB/s (9 B/weight) | share of ceiling | GB/s (5 B/weight) | speed-up over numpy |")
    print("|---|---|---|---|---|---|")
    t_np = t["numpy (same formula)"]
    for name, s in t.items():
        print(f"| {name} | {s * 1e3:.2f} ms | {9 * N / s / 1e9:.1f} | {9 * N / s / 1e9 / bw:.0%} | {5 * N / s / 1e9:.1f} | {t_np / s:.1f}x |")
    best = min(s for name, s in t.items() if name.startswith("hybrit"))
    print(f"\nGoals: at least 70% of the ceiling -> {9 * N / best / 1e9 / bw:.0%}; at least 20x numpy -> {t_np / best:.1f}x.")
    print("16M floats are 64 MiB against a 32 MiB L3, so part of the second read can come from cache: "
          "a share above 100% of the DRAM ceiling is that, not a measuring error. Far past the cache (9 rounds):\n")
    print("| 64M floats (256 MiB) | time | GB/s (9 B/weight) | share of ceiling | GB/s (5 B/weight) |")
    print("|---|---|---|---|---|")
    for name, s in t_big.items():
        print(f"| {name} | {s * 1e3:.1f} ms | {36 * N / s / 1e9:.1f} | {36 * N / s / 1e9 / bw:.0%} | {20 * N / s / 1e9:.1f} |")
    print("\nA new output array costs a page fault per 4 KiB page on first touch; passing out= avoids it.")


if __name__ == "__main__":
    main()
