#!/usr/bin/env bash
# Runs every benchmark of the foundation and writes experiments/results/foundation.md.
# Needs a release build (./run.sh build). Takes about five minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")"
out=results/foundation.md
{
  echo "# Foundation benchmarks"
  echo
  echo "Produced by \`experiments/run_all.sh\` (each section names its own command)."
  echo
  /usr/bin/python3 bench_quantize.py
  echo
  /usr/bin/python3 bench_matmul.py
  echo
  /usr/bin/python3 bench_routing.py
} > "$out.tmp"
mv "$out.tmp" "$out"
cat "$out"
