#!/usr/bin/env bash
# One entry point for a fresh Debian 12 machine: installs the Debian packages hybrit needs,
# builds with CMake, then runs what you ask for.
#
#   ./run.sh demo    the main job: the hardware probe, then `hybrit train configs/tiny.yaml`
#   ./run.sh test    the whole test suite (C++ GoogleTest + pytest, through ctest)
#   ./run.sh asan    the test suite under AddressSanitizer + UndefinedBehaviorSanitizer
#   ./run.sh fuzz    the libFuzzer targets (fuzz/), each for HYBRIT_FUZZ_SECONDS (default 60)
#   ./run.sh build   install and build only
# `test` runs the suite and then the fuzz targets (clang, ASan, UBSan), as CI does.
set -euo pipefail
cd "$(dirname "$0")"
mode=${1:-demo}

packages=(build-essential cmake ninja-build pkg-config
          libeigen3-dev libtbb-dev libhdf5-dev libyaml-cpp-dev pybind11-dev python3-dev
          libgtest-dev libgmock-dev libbenchmark-dev libcpuinfo-dev libcli11-dev nlohmann-json3-dev libsentencepiece-dev libcpp-httplib-dev
          libopenmpi-dev openmpi-bin
          python3-numpy python3-pytest python3-torch python3-h5py python3-yaml python3-sklearn fortunes qemu-user
          libopenblas0-pthread python3-matplotlib clang libclang-rt-14-dev)

install_packages() {
  local missing=()
  for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "run.sh: installing ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

build() {  # $1: preset
  cmake --preset "$1" | { grep "^-- hybrit:" || true; }
  cmake --build --preset "$1"
}

fuzz() {  # every fuzz target for a bounded time, two at once
  cmake --preset fuzz -DHYBRIT_FUZZ_SECONDS="${HYBRIT_FUZZ_SECONDS:-60}" | { grep "^-- hybrit:" || true; }
  cmake --build --preset fuzz
  ctest --preset fuzz -j2 --timeout 900
}

case "$mode" in
  demo)
    install_packages
    build release
    ./build/release/cli/hybrit info
    echo
    ./build/release/cli/hybrit train configs/tiny.yaml
    ;;
  test)
    install_packages
    build release
    ctest --preset release --timeout 900
    fuzz
    ;;
  fuzz)
    install_packages
    fuzz
    ;;
  asan)
    install_packages
    build asan
    ctest --preset asan --timeout 1800
    ;;
  build)
    install_packages
    build release
    ;;
  *)
    echo "usage: ./run.sh demo|test|asan|fuzz|build" >&2
    exit 2
    ;;
esac
