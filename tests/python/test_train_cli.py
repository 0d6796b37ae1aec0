"""`hybrit train`: the run folder, determinism, bad input, interruption and non-finite losses."""
import json
import os
import signal
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
SMALL_RUN = ["--set", "model.n_layers=1", "--set", "model.dim=64", "--set", "train.batch=4", "--set", "train.eval_batches=2",
             "--set", "train.sample_tokens=20"]


def train(cli, out, *args, check=True):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYBRIT_")}
    return subprocess.run([cli, "train", TINY, "--out", str(out), *SMALL_RUN, *args], capture_output=True, text=True, env=env, check=check, timeout=600)


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_run_writes_its_folder(cli, tmp_path):
    run = tmp_path / "run"
    r = train(cli, run, "--set", "train.steps=6", "--set", "train.eval_every=3")
    assert "done after 6 steps" in r.stdout and "A sample from the model" in r.stdout
    assert "dispatcher metrics" in r.stderr and "matmul" in (run / "dispatch_metrics.txt").read_text()
    for name in ("config.yaml", "tokenizer.json", "metrics.jsonl", "sample.txt", "tokens.bin", "ckpt-00000006.h5"):
        assert (run / name).exists(), name
    lines = metrics(run)
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]
    assert [("val_loss" in m) for m in lines] == [False, False, True, False, False, True]
    for m in lines:
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"} <= set(m)
    resolved = (run / "config.yaml").read_text()
    assert "steps: 6" in resolved and "dim: 64" in resolved
    assert json.loads((run / "tokenizer.json").read_text())["vocab_size"] == 257


def test_a_bpe_run_keeps_its_tokenizer(cli, tmp_path):
    run = tmp_path / "run"
    train(cli, run, "--set", "train.steps=3", "--set", "data.tokenizer=bpe", "--set", "data.vocab_size=512")
    tok = json.loads((run / "tokenizer.json").read_text())
    assert tok["kind"] == "bpe" and tok["model"] == "tokenizer.model" and 320 <= tok["vocab_size"] <= 512
    assert (run / "tokenizer.model").stat().st_size > 1000
    assert f"vocab_size: {tok['vocab_size']}" in (run / "config.yaml").read_text()


def test_runs_repeat_bit_for_bit(cli, tmp_path):
    train(cli, tmp_path / "a", "--set", "train.steps=5")
    train(cli, tmp_path / "b", "--set", "train.steps=5")
    losses = lambda run: [m["loss"] for m in metrics(run)]  # noqa: E731
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert (tmp_path / "a" / "sample.txt").read_text() == (tmp_path / "b" / "sample.txt").read_text()


def test_bad_input_is_one_line(cli, tmp_path):
    run = tmp_path / "run"
    train(cli, run, "--set", "train.steps=2")
    again = train(cli, run, "--set", "train.steps=2", check=False)
    assert again.returncode == 1 and again.stderr.strip() == f"hybrit: error: {run}: already holds a run (metrics.jsonl); choose another --out or --resume auto"
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  dim: 50\n  n_heads: 4\n")
    r = subprocess.run([cli, "train", str(bad), "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip() == f"hybrit: error: {bad}:2: model.dim (50) must be divisible by model.n_heads (4)"
    r = train(cli, tmp_path / "y", "--set", "train.stepz=3", check=False)
    assert r.returncode == 1 and "--set train.stepz=3: train.stepz: unknown key" in r.stderr


def test_sigint_finishes_the_step_and_exits_0(cli, tmp_path):
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYBRIT_")}
    p = subprocess.Popen([cli, "train", TINY, "--out", str(run), *SMALL_RUN, "--set", "train.steps=100000"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and (not (run / "metrics.jsonl").exists() or len((run / "metrics.jsonl").read_text().splitlines()) < 3):
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    steps = len(metrics(run))
    assert f"stopped after {steps} steps" in out
    assert "interrupted after step" in err


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_loss_stops_or_skips(cli, tmp_path, policy):
    blow_up = ["--set", "optim.muon.lr=1e30", "--set", "optim.adamw.lr=1e30", "--set", "optim.grad_clip=0", "--set", "model.quant=none",
               "--set", "train.steps=4", "--set", f"train.on_nonfinite={policy}", "--set", "train.sample_tokens=0"]
    r = train(cli, tmp_path / "run", *blow_up, check=False)
    if policy == "stop":
        assert r.returncode == 1
        assert "step 2: the loss is NaN; stopping before any update" in r.stderr
        assert len(metrics(tmp_path / "run")) == 1  # the good step only
    else:
        assert r.returncode == 0, r.stderr
        assert [m.get("skipped", False) for m in metrics(tmp_path / "run")] == [False, True, True, True]


def test_a_step_that_cannot_fit_in_memory_is_refused_before_it_starts(cli, tmp_path):
    run = tmp_path / "huge"
    r = train(cli, run, "--set", "model.context=65536", "--set", "train.batch=64", "--set", "train.steps=1", check=False)
    assert r.returncode == 1, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "for a training step" in line and "micro-batches of 64 sequences of 65536 tokens" in line, line
    assert "raise train.grad_accum, set train.recompute: block" in line, line
    assert not run.exists()  # refused before the run folder is touched


def test_context_8192_trains_and_evaluates(cli, tmp_path):
    run = tmp_path / "long"
    r = train(cli, run, "--set", "model.context=8192", "--set", "model.n_heads=2", "--set", "model.n_kv_heads=1", "--set", "train.batch=1", "--set", "train.steps=2",
              "--set", "train.eval_batches=1", "--set", "train.sample_tokens=0", "--set", "train.recompute=block")
    assert "done after 2 steps" in r.stdout
    lines = metrics(run)
    assert len(lines) == 2 and 0 < lines[-1]["val_loss"] < 6.0


def backends_that_ran(run):
    """The backends in a run's dispatch_metrics.txt, per op."""
    lines = (run / "dispatch_metrics.txt").read_text().splitlines()[1:]
    out = {}
    for line in lines:
        op, backend = line.split()[:2]
        out.setdefault(op, set()).add(backend)
    return out


# The one precedence rule, from the front end: run config < --config < environment < --backend,
# and `auto` at a level undoes the levels below it.
@pytest.mark.parametrize("env, args, sets, expect", [
    ({"HYBRIT_BACKEND": "c"}, ["--backend", "tbb"], [], "tbb"),       # the flag beats the environment
    ({"HYBRIT_BACKEND": "tbb"}, [], ["dispatch.backend=c"], "tbb"),   # the environment beats the run's YAML
    ({}, [], ["dispatch.backend=c"], "c"),                             # --set reaches the dispatch section
    ({"HYBRIT_BACKEND": "c"}, ["--backend", "auto"], [], None),      # auto undoes the environment
    ({}, ["--config", "GLOBAL"], [], "c"),                             # the global --config reaches train
    ({"HYBRIT_BACKEND": "tbb"}, ["--config", "GLOBAL"], [], "tbb"),   # ... below the environment
])
def test_dispatch_settings_resolve_in_the_documented_order(cli, tmp_path, env, args, sets, expect):
    global_config = tmp_path / "global.yaml"
    global_config.write_text("dispatch:\n  backend: c\n")
    args = [str(global_config) if a == "GLOBAL" else a for a in args]
    base = {k: v for k, v in os.environ.items() if not k.startswith("HYBRIT_")}
    run = tmp_path / "run"
    cmd = [cli, *args, "train", TINY, "--out", str(run), *SMALL_RUN, "--set", "train.steps=2", "--set", "train.sample_tokens=0"]
    for s in sets:
        cmd += ["--set", s]
    subprocess.run(cmd, capture_output=True, text=True, env={**base, **env}, check=True, timeout=600)
    ran = backends_that_ran(run)
    if expect is None:  # the dispatcher decides: the large matmuls go to tbb on 2 cores, the small ones may stay on c
        assert "tbb" in set().union(*ran.values()), ran
    else:
        assert "matmul" in ran and all(b == {expect} for b in ran.values()), ran


def test_a_bad_dispatch_value_from_any_source_is_one_line(cli, tmp_path):
    base = {k: v for k, v in os.environ.items() if not k.startswith("HYBRIT_")}
    r = subprocess.run([cli, "train", TINY, "--out", str(tmp_path / "a"), "--set", "dispatch.backend=nonsense"], capture_output=True, text=True,
                       env=base, timeout=60)
    assert r.returncode == 1 and r.stderr.strip() == \
        "hybrit: error: --set dispatch.backend=nonsense: dispatch.backend: expected c, tbb, cuda or auto, got 'nonsense'"
    r = subprocess.run([cli, "train", TINY, "--out", str(tmp_path / "b")], capture_output=True, text=True,
                       env={**base, "HYBRIT_THREADS": "5000"}, timeout=60)
    assert r.returncode == 1 and r.stderr.strip() == "hybrit: error: HYBRIT_THREADS: expected a thread count 0..4096 or auto, got '5000'"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
