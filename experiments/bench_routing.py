#!/usr/bin/python3
"""Automatic routing against every fixed backend at each size of dispatch-report's quick ladder.

One run: measure and save a profile with `hybrit dispatch-report --quick --save`, then time each op
through the dispatcher in auto mode and forced to each backend (`hybrit_bench --routing`: C++, so
the dispatcher's own per-call cost is included and Python's is not; the modes interleaved over 7
rounds, medians). Goal: auto within 10% of the best fixed backend at every size.
"""
import json
import os
import subprocess
import tempfile

from common import BENCH, CLI, machine_header


def main():
    with tempfile.TemporaryDirectory() as tmp:
        profile = os.path.join(tmp, "profile.json")
        subprocess.run([CLI, "dispatch-report", "--quick", "--save", profile], check=True, capture_output=True)
        out = subprocess.run([BENCH, "--routing"], check=True, capture_output=True, text=True,
                             env=dict(os.environ, HYBRIT_PROFILE=profile))
    cells = {(row.pop("op"), row.pop("size")): row for row in json.loads(out.stdout)}
    print(machine_header("automatic routing vs fixed backends (quick ladder)", "/usr/bin/python3 experiments/bench_routing.py"))
    print("| op | size | c | tbb | auto | auto / best fixed |")
    print("|---|---|---|---|---|---|")
    worst = 0
    for (op, size), t in cells.items():
        fixed = {k: v for k, v in t.items() if k != "auto"}
        ratio = t["auto"] / min(fixed.values())
        worst = max(worst, ratio)
        fmt = lambda s: f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"
        print(f"| {op} | {size} | {fmt(t['c'])} | {fmt(t['tbb'])} | {fmt(t['auto'])} | {ratio:.2f} |")
    print(f"\nGoal: auto within 10% of the best fixed backend at every size -> worst ratio {worst:.2f}.")


if __name__ == "__main__":
    main()
