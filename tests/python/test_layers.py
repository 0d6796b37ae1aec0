"""The layering rule of docs/DESIGN.md (tests/check_layers.py) holds for the repository, and the
checker reports an upward include or a stray tbb:: with its file and line."""
import pathlib
import subprocess
import sys

CHECKER = pathlib.Path(__file__).resolve().parents[1] / "check_layers.py"
REPO = pathlib.Path(__file__).resolve().parents[2]


def run_checker(root):
    return subprocess.run([sys.executable, str(CHECKER), str(root)], capture_output=True, text=True, timeout=120)


def test_repository_keeps_its_layers():
    result = run_checker(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert ", 0 problems" in result.stdout


def test_upward_include_and_stray_tbb_are_reported(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "ok.hpp").write_text('#include "core/tensor.hpp"\n#include "dispatch/dispatcher.hpp"\n')
    (tmp_path / "model" / "bad.cpp").write_text(
        '#include "model/ok.hpp"\n#include "training/trainer.hpp"\nvoid f() { tbb::parallel_for(0, 1, [](int) {}); }\n')
    (tmp_path / "inference").mkdir()
    (tmp_path / "inference" / "up.hpp").write_text('// a comment\n  #  include "clustering/reduce.hpp"\n')
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "low.hpp").write_text('#include <vector>\n#include "dispatch/dispatcher.hpp"\n')
    result = run_checker(tmp_path)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert 'model/bad.cpp:2: model includes "training/..." (allowed: core, dispatch)' in lines
    assert "model/bad.cpp:3: tbb:: outside backends/tbb/ and dispatch/report.cpp" in lines
    assert 'inference/up.hpp:2: inference includes "clustering/..." (allowed: core, dispatch, model)' in lines
    assert 'core/low.hpp:2: core includes "dispatch/..." (allowed: nothing of hybrit)' in lines
    assert lines[-1] == "check_layers: 4 files, 4 problems"


def test_an_empty_tree_is_an_error_not_a_pass(tmp_path):
    result = run_checker(tmp_path)
    assert result.returncode == 1
    assert "no sources" in result.stderr
