"""The `hybrit` command line: outputs, exit codes and one-line errors."""
import json
import os
import subprocess

import pytest
import yaml

import hybrit


def run(cli, *args, env=None, check=False):
    # The caller's own HYBRIT_* settings must not leak into these checks.
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HYBRIT_")}
    full_env.update(env or {})
    return subprocess.run([cli, *args], capture_output=True, text=True, env=full_env, check=check, timeout=600)


def test_info_prints_the_probe(cli):
    out = run(cli, "info", check=True).stdout
    for field in ("CPU", "ISA", "cores", "caches", "memory", "CUDA", "fingerprint"):
        assert field in out
    data = json.loads(run(cli, "info", "--json", check=True).stdout)
    assert data["granted_cpus"] >= 1
    # The ISA flags agree with the kernel's view of the CPU (/proc/cpuinfo), AMX included.
    flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":")[1].split())
    isa_line = next(line for line in out.splitlines() if line.startswith("ISA"))
    for name, proc_names in (("avx2", {"avx2"}), ("avx512f", {"avx512f"}), ("avx512vnni", {"avx512_vnni"}), ("amx-int8", {"amx_tile", "amx_int8"})):
        assert data["isa"][name] == (proc_names <= flags), name
        assert (f" {name} " in f" {isa_line} ") == data["isa"][name], (name, isa_line)
    if data["isa"]["amx-int8"] and data["simd"] == "avx512":
        assert "matmul_ternary on AMX tiles" in isa_line or "did not grant the tile state" in isa_line


def test_dispatch_report_json_and_save(cli, tmp_path):
    path = tmp_path / "p.json"
    r = run(cli, "dispatch-report", "--quick", "--json", "--ops", "pack_ternary", "--save", str(path))
    report = json.loads(r.stdout)
    assert [o["op"] for o in report["ops"]] == ["pack_ternary"]
    assert len(report["ceiling_runs"]) >= 2
    if report["too_noisy"]:  # a busy machine (the suite runs files side by side): no profile from it
        assert r.returncode == 1 and "too noisy" in r.stderr and not path.exists()
        assert report["recommendations"][0].startswith("Warning: the machine is too noisy")
    else:
        assert r.returncode == 0 and "saved the measured dispatch profile" in r.stderr
        assert json.loads(path.read_text())["format"] == "hybrit-dispatch-profile"
    text = run(cli, "dispatch-report", "--quick", "--ops", "pack_ternary", check=True).stdout
    assert "Recommendations" in text and "winner" in text


@pytest.mark.parametrize(
    "args,env,message",
    [
        (["--backend", "gpu", "dispatch-report"], None, "hybrit: error: --backend: expected c, tbb or cuda, got 'gpu'"),
        (["dispatch-report", "--ops", "nope"], None, "hybrit: error: --ops: unknown op 'nope'"),
        (["dispatch-report", "--quick"], {"HYBRIT_BACKEND": "gpu"}, "hybrit: error: HYBRIT_BACKEND: expected c, tbb, cuda or auto, got 'gpu'"),
        (["dispatch-report"], {"HYBRIT_PROFILE": "/nonexistent/profile.json"}, "hybrit: error: dispatch profile /nonexistent/profile.json: cannot open"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(cli, args, env, message):
    r = run(cli, *args, env=env)
    assert r.returncode == 1
    assert r.stderr.startswith(message), r.stderr
    assert r.stderr.count("\n") == 1


def test_bad_config_names_file_line_and_key(cli, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("dispatch:\n  backend: tbb\n  thread: 2\n")
    r = run(cli, "--config", str(cfg), "dispatch-report", "--quick")
    assert r.returncode == 1
    assert r.stderr.strip() == f"hybrit: error: {cfg}:3: dispatch.thread: unknown key (expected one of: backend, ops, profile, simd, threads)"


def test_forcing_a_missing_cuda_backend_fails(cli):
    info = json.loads(run(cli, "info", "--json", check=True).stdout)
    if info["cuda_devices"]:
        pytest.skip("a GPU is present")
    r = run(cli, "--backend", "cuda", "dispatch-report", "--quick")
    assert r.returncode == 1 and "not available" in r.stderr


def test_usage_errors_exit_2(cli):
    assert run(cli, "frobnicate").returncode == 2
    assert run(cli).returncode == 2


def test_help_config_lists_every_key_a_run_resolves(cli):
    # Every key of a resolved config (all the tiny.yaml run writes) is in the help, with its default.
    r = run(cli, "train", "--help-config", check=True)
    lines = {line.split(" [")[0].strip(): line for line in r.stdout.splitlines() if line.startswith("  ")}
    resolved = yaml.safe_load(hybrit.Trainer({"train": {"sample_tokens": 0}}).config_yaml())

    def keys(node, prefix=""):
        for k, v in node.items():
            if isinstance(v, dict):
                yield from keys(v, prefix + k + ".")
            else:
                yield prefix + k
    for key in keys(resolved):
        assert key in lines, key
    assert lines["train.steps"].startswith("  train.steps [1000]: ") and "an integer in [1, " in lines["train.steps"]
    assert lines["train.sample_tokens"].startswith("  train.sample_tokens [200]: ")
