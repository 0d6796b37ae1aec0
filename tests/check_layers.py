#!/usr/bin/python3
"""The layering rule of docs/DESIGN.md, checked: each layer includes only the layers below it
(its own `#include "layer/..."` lines), and `tbb::` appears only where the design allows it.
Prints every violation as `file:line: layer includes "x" (allowed: ...)`; exit status 1 if any.

Usage: check_layers.py [REPO_ROOT]   (default: the folder above tests/)
"""
import pathlib
import re
import sys

# Which hybrit folders each layer may include (besides itself). Front ends (cli, python, fuzz,
# tests, experiments) may include any layer and are not listed.
ALLOWED = {
    "core": set(),
    "backends": {"core"},
    "dispatch": {"backends", "core"},
    "model": {"dispatch", "core"},
    "training": {"model", "dispatch", "core"},
    "clustering": {"model", "dispatch", "core"},
    "inference": {"model", "dispatch", "core"},
}
LAYERS = set(ALLOWED) | {"cli", "python", "fuzz", "tests", "experiments"}
# Every other parallel loop runs through Dispatcher::parallel_for, so HYBRIT_THREADS bounds it.
TBB_ALLOWED = ("backends/tbb/", "dispatch/report.cpp")
SOURCES = ("*.c", "*.h", "*.cpp", "*.hpp", "*.cu", "*.cuh")
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"/]+)/')


def main() -> int:
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).resolve().parents[1])
    problems, checked = [], 0
    for layer, allowed in ALLOWED.items():
        for pattern in SOURCES:
            for path in sorted((root / layer).rglob(pattern)):
                rel = path.relative_to(root).as_posix()
                checked += 1
                for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                    m = INCLUDE.match(line)
                    if m and m.group(1) in LAYERS and m.group(1) != layer and m.group(1) not in allowed:
                        problems.append(f'{rel}:{number}: {layer} includes "{m.group(1)}/..." '
                                        f'(allowed: {", ".join(sorted(allowed)) or "nothing of hybrit"})')
                    if "tbb::" in line and not rel.startswith(TBB_ALLOWED) and not line.lstrip().startswith("//"):
                        problems.append(f"{rel}:{number}: tbb:: outside {' and '.join(TBB_ALLOWED)}")
    if checked == 0:
        print(f"check_layers: no sources under {root}", file=sys.stderr)
        return 1
    for p in problems:
        print(p)
    print(f"check_layers: {checked} files, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
