#!/usr/bin/env bash
# Installs the build tree ($1) into a temporary prefix, builds tests/install against it with
# find_package(hybrit), runs it, and checks what was installed.
set -euo pipefail
build=$1
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cmake --install "$build" --prefix "$work/prefix" >"$work/log" 2>&1 || { cat "$work/log"; exit 1; }
for f in bin/hybrit share/hybrit/configs/tiny.yaml include/hybrit/training/trainer.hpp include/hybrit/core/tensor.hpp lib/cmake/hybrit/hybritConfig.cmake; do
  [ -e "$work/prefix/$f" ] || { echo "not installed: $f"; exit 1; }
done
quiet() { "$@" >"$work/log" 2>&1 || { cat "$work/log"; exit 1; }; }
quiet cmake -S "$here" -B "$work/build" -G Ninja -DCMAKE_PREFIX_PATH="$work/prefix" -DCMAKE_BUILD_TYPE=Release
quiet cmake --build "$work/build"
out=$("$work/build/consumer")
echo "$out"
[[ $out == "dim 128 params "* ]]
"$work/prefix/bin/hybrit" --version
