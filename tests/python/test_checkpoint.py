"""HDF5 checkpoints: exact resume, damaged files, crashes mid-save, and readability with h5py."""
import json
import os
import shutil
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
SMALL = ["--set", "model.n_layers=2", "--set", "model.dim=64", "--set", "train.batch=4", "--set", "train.eval_batches=2",
         "--set", "train.sample_tokens=0", "--set", "train.eval_every=3"]


def train(cli, out, *args, check=True):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYBRIT_")}
    return subprocess.run([cli, "train", TINY, "--out", str(out), *SMALL, *args], capture_output=True, text=True, env=env, check=check, timeout=600)


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("quant,extra", [("ternary", []), ("none", []), ("ternary", ["--set", "train.grad_accum=2", "--set", "train.recompute=block"])],
                         ids=["ternary", "none", "ternary-grad_accum-recompute"])
def test_a_resumed_run_repeats_the_uninterrupted_one_bit_for_bit(cli, tmp_path, quant, extra):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(cli, straight, "--set", "train.steps=8", "--set", f"model.quant={quant}", *extra)
    # The first leg stops at 4 but follows the 8-step schedule, as an interrupted run would.
    train(cli, split, "--set", "train.steps=4", "--set", "optim.schedule.total_steps=8", "--set", f"model.quant={quant}", *extra)
    r = train(cli, split, "--set", "train.steps=8", "--set", f"model.quant={quant}", "--resume", "auto", *extra)
    assert "resumed from" in r.stderr and "ckpt-00000004.h5" in r.stderr
    a, b = metrics(straight), metrics(split)
    assert [m["step"] for m in b] == list(range(1, 9))
    assert [m["loss"] for m in a] == [m["loss"] for m in b]  # bit for bit (JSON keeps 17 digits)
    assert [m["grad_norm"] for m in a] == [m["grad_norm"] for m in b]
    val_a = {m["step"]: m["val_loss"] for m in a if "val_loss" in m}
    val_b = {m["step"]: m["val_loss"] for m in b if "val_loss" in m}
    assert all(val_b[s] == v for s, v in val_a.items())


@pytest.mark.parametrize("recompute", ["attention", "block"])
def test_recomputing_activations_changes_no_bit(cli, tmp_path, recompute):
    kept, again = tmp_path / "kept", tmp_path / "again"
    train(cli, kept, "--set", "train.steps=5")
    train(cli, again, "--set", "train.steps=5", "--set", f"train.recompute={recompute}")
    a, b = metrics(kept), metrics(again)
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    assert [m["grad_norm"] for m in a] == [m["grad_norm"] for m in b]
    assert all(m["peak_rss_bytes"] > 0 for m in b)


def test_checkpoints_are_readable_with_h5py(cli, tmp_path):
    run = tmp_path / "run"
    train(cli, run, "--set", "train.steps=3", "--set", "data.tokenizer=bpe", "--set", "data.vocab_size=400")
    with h5py.File(run / "ckpt-00000003.h5", "r") as f:
        assert f.attrs["format"] == "hybrit-checkpoint" and f.attrs["format_version"] == 3
        assert f.attrs["step"] == 3 and f.attrs["tokens_seen"] == 3 * 4 * 64
        assert "dim: 64" in f.attrs["config"]
        assert json.loads(f.attrs["tokenizer"])["kind"] == "bpe"
        assert "ema" in f.attrs["muon_momentum_convention"]
        w = f["params/blocks.0.wq"]
        assert w.shape == (64, 64) and w.dtype == np.float32
        assert set(f["optim"].keys()) == {"adam_m", "adam_v", "muon_momentum"}
        # Only the state each parameter's optimizer keeps: Muon's momentum for the block matrices,
        # AdamW's moments for the embedding, head and norm gains.
        assert "blocks.0.wq" in f["optim/muon_momentum"] and "blocks.0.wq" not in f["optim/adam_m"]
        assert "tok_emb" in f["optim/adam_m"] and "tok_emb" in f["optim/adam_v"] and "tok_emb" not in f["optim/muon_momentum"]
        assert set(f["optim/adam_m"]) == set(f["optim/adam_v"]) and not set(f["optim/adam_m"]) & set(f["optim/muon_momentum"])
        assert set(f["optim/adam_m"]) | set(f["optim/muon_momentum"]) == set(f["params"])
        assert f["tokenizer_model"].shape[0] > 1000
        assert int(w.attrs["fnv1a64"]) != 0
        assert int(f.attrs["meta_fnv1a64"]) == metadata_checksum(f)


def as_version_2(path):
    """Rewrites a checkpoint as format version 2 wrote it: every optimizer slot for every parameter
    (the unused ones zero), each with its checksum, and the metadata checksum over version 2."""
    with h5py.File(path, "r+") as f:
        for slot in ("adam_m", "adam_v", "muon_momentum"):
            for name, p in f["params"].items():
                if name not in f["optim"][slot]:
                    zeros = np.zeros(p.shape, dtype=np.float32)
                    ds = f["optim"][slot].create_dataset(name, data=zeros)
                    ds.attrs["fnv1a64"] = np.uint64(fnv1a64(zeros.tobytes()))
        f.attrs["format_version"] = np.int32(2)
        f.attrs["meta_fnv1a64"] = np.uint64(metadata_checksum(f))


def fnv1a64(data):
    h = 1469598103934665603
    for byte in data:
        h = ((h ^ byte) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h


def test_a_version_2_checkpoint_resumes_as_the_version_3_one_does(cli, tmp_path):
    # A run saved by the previous format (all slots kept) continues bit for bit like the new file.
    run = tmp_path / "run"
    train(cli, run, "--set", "model.n_layers=1", "--set", "model.dim=32", "--set", "train.steps=2", "--set", "train.checkpoint_every=2")
    old = tmp_path / "old"
    shutil.copytree(run, old)
    as_version_2(old / "ckpt-00000002.h5")
    with h5py.File(old / "ckpt-00000002.h5", "r") as f:
        assert f.attrs["format_version"] == 2 and "blocks.0.wq" in f["optim/adam_m"]
    for folder in (run, old):
        train(cli, folder, "--set", "model.n_layers=1", "--set", "model.dim=32", "--set", "train.steps=4", "--resume", "auto")
    same = lambda folder: [(m["step"], m["loss"], m["grad_norm"], m.get("val_loss")) for m in metrics(folder)]
    assert same(run) == same(old)
    assert (old / "ckpt-00000004.h5").stat().st_size < (old / "ckpt-00000002.h5").stat().st_size


def metadata_checksum(f):
    """meta_fnv1a64 as model/checkpoint.cpp defines it: FNV-1a 64 over the root attributes, each
    as its decimal or text form, prefixed by its length (u64, little-endian)."""
    values = [f.attrs["format"], str(f.attrs["format_version"]), str(f.attrs["step"]), str(f.attrs["tokens_seen"]), str(f.attrs["seed"]),
              f.attrs["config"], f.attrs["tokenizer"], f.attrs["muon_momentum_convention"]]
    h = 1469598103934665603
    for v in values:
        data = v.encode() if isinstance(v, str) else bytes(v)
        for byte in len(data).to_bytes(8, "little") + data:
            h = ((h ^ byte) * 1099511628211) % 2**64
    return h


def damage(path, how):
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "flipped byte":
        with h5py.File(path, "r") as f:
            offset = f["params/blocks.0.wq"].id.get_offset()
        data = bytearray(path.read_bytes())
        data[offset + 100] ^= 0x40
        path.write_bytes(bytes(data))
    elif how == "wrong version":
        with h5py.File(path, "r+") as f:
            f.attrs["format_version"] = 99
    elif how == "missing dataset":
        with h5py.File(path, "r+") as f:
            del f["optim/muon_momentum/blocks.1.w_up"]
    elif how == "step attribute":
        with h5py.File(path, "r+") as f:
            f.attrs["step"] = np.int64(f.attrs["step"]) ^ (1 << 32)  # one flipped bit: "done after 4294967300 steps"
    elif how == "config text":
        with h5py.File(path, "r+") as f:
            f.attrs["config"] = f.attrs["config"].replace("dim: 64", "dim: 65")
    elif how == "config that does not parse":  # damaged, and its checksum made to match
        with h5py.File(path, "r+") as f:
            f.attrs["config"] = f.attrs["config"].replace("model:", "model: [")
            f.attrs["meta_fnv1a64"] = np.uint64(metadata_checksum(f))
    elif how == "tokenizer that does not parse":  # damaged, and its checksum made to match
        with h5py.File(path, "r+") as f:
            f.attrs["tokenizer"] = f.attrs["tokenizer"][:-3]
            f.attrs["meta_fnv1a64"] = np.uint64(metadata_checksum(f))
    elif how == "lost datasets":  # what a damaged B-tree looks like to a reader: groups with no links
        with h5py.File(path, "r+") as f:
            del f["params"]
            del f["optim"]
    elif how == "shape mismatch":
        with h5py.File(path, "r+") as f:
            data = f["params/final_norm"][...]
            del f["params/final_norm"]
            f.create_dataset("params/final_norm", data=np.concatenate([data, data]))


MESSAGES = {
    "truncated": "(truncated or damaged?)",
    "flipped byte": "dataset params/blocks.0.wq fails its checksum (the file is damaged)",
    "wrong version": "checkpoint format version 99, this hybrit reads versions 1 to 3",
    "missing dataset": "dataset optim/muon_momentum/blocks.1.w_up is missing",
    "step attribute": "the metadata (step, seed, config, tokenizer) fails its checksum (the file is damaged)",
    "config text": "the metadata (step, seed, config, tokenizer) fails its checksum (the file is damaged)",
    "config that does not parse": "its config does not parse",
    "tokenizer that does not parse": "its tokenizer attribute is not JSON",
    "lost datasets": "dataset params/tok_emb is missing",
    "shape mismatch": "dataset params/final_norm has shape (128,), the model needs (64,)",
}


@pytest.mark.parametrize("how", list(MESSAGES))
def test_damaged_checkpoints_are_refused_and_auto_falls_back(cli, tmp_path, how):
    run = tmp_path / "run"
    train(cli, run, "--set", "train.steps=4", "--set", "train.checkpoint_every=2", "--set", "optim.schedule.total_steps=6")
    newest = run / "ckpt-00000004.h5"
    damage(newest, how)
    r = train(cli, run, "--set", "train.steps=6", "--resume", str(newest), check=False)
    assert r.returncode == 1
    assert r.stderr.startswith(f"hybrit: error: {newest}: ") and MESSAGES[how] in r.stderr and r.stderr.count("\n") == 1, r.stderr
    # auto skips it, says so, and resumes from the older one
    r = train(cli, run, "--set", "train.steps=6", "--resume", "auto")
    assert f"not resuming from {newest}" in r.stderr and "resumed from" in r.stderr and "ckpt-00000002.h5" in r.stderr
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4, 5, 6]


def folder_state(run):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run.iterdir()) if p.is_file()}


def test_a_refused_resume_writes_nothing_in_the_run_folder(cli, tmp_path):
    # A run made with data.format=text, resumed with the config's own format: refused, and the
    # token cache, config, tokenizer and metrics are the ones the run wrote.
    run = tmp_path / "run"
    train(cli, run, "--set", "train.steps=2", "--set", "data.format=text", "--set", "data.sources=/usr/share/common-licenses/GPL-3")
    before = folder_state(run)
    r = train(cli, run, "--set", "train.steps=4", "--set", "data.sources=/usr/share/common-licenses/GPL-3", "--resume", "auto", check=False)
    assert r.returncode == 1 and "data.format is text in the checkpoint but auto in" in r.stderr, r.stderr
    assert folder_state(run) == before


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(cli, tmp_path):
    run = tmp_path / "run"
    train(cli, run, "--set", "train.steps=4", "--set", "optim.schedule.total_steps=6")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 3.1')  # a crash mid-write
    r = train(cli, run, "--set", "train.steps=6", "--resume", "auto")
    assert "metrics.jsonl:5: not a metrics line (torn by a crash mid-write?); dropped" in r.stderr
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4, 5, 6]


def test_architecture_changes_are_refused_at_resume(cli, tmp_path):
    run = tmp_path / "run"
    train(cli, run, "--set", "train.steps=2")
    r = train(cli, run, "--set", "train.steps=4", "--set", "model.n_layers=3", "--resume", "auto", check=False)
    assert r.returncode == 1
    assert "model.n_layers is 2 in the checkpoint but 3 in" in r.stderr and "cannot change when a run resumes" in r.stderr


def test_sigkill_during_saves_leaves_the_previous_checkpoint_loadable(cli, tmp_path):
    """Checkpoints every step of a model large enough that saving takes a while; kill -9 at
    random moments; every ckpt-*.h5 left behind (not the .tmp being written) must load."""
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYBRIT_")}
    args = [cli, "train", TINY, "--out", str(run), "--set", "model.dim=256", "--set", "model.n_layers=6", "--set", "model.n_heads=8",
            "--set", "train.batch=1", "--set", "train.steps=100000", "--set", "train.checkpoint_every=1", "--set", "train.keep_checkpoints=2",
            "--set", "train.sample_tokens=0", "--set", "train.eval_every=0"]
    rng = np.random.default_rng()
    for attempt in range(4):
        saved_before = {c.name for c in run.glob("ckpt-*.h5")}
        p = subprocess.Popen(args + (["--resume", "auto"] if attempt else []), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        # Wait for this attempt's first checkpoint (an event, however busy the machine), then kill
        # at a random moment of the saves that follow, one per step.
        deadline = time.monotonic() + 300
        while not {c.name for c in run.glob("ckpt-*.h5")} - saved_before and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert p.poll() is None, "the run ended before it was killed"
        time.sleep(rng.uniform(0, 0.5))
        p.send_signal(signal.SIGKILL)
        p.wait()
        checkpoints = sorted(run.glob("ckpt-*.h5"))
        assert checkpoints, "no checkpoint was written before the kill"
        for c in checkpoints:
            with h5py.File(c, "r") as f:
                assert f.attrs["format"] == "hybrit-checkpoint"
                for name, ds in f["params"].items():
                    ds[...]  # every dataset reads back
    r = subprocess.run(args[:-6] + ["--set", f"train.steps={len(metrics(run)) + 1}", "--set", "train.sample_tokens=0", "--resume", "auto"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr


def test_inspect_export_and_load_checkpoint(cli, tmp_path):
    import hybrit

    run = tmp_path / "run"
    train(cli, run, "--set", "train.steps=3", "--set", "train.keep_best=true", "--set", "train.eval_every=1")
    ckpt = run / "ckpt-00000003.h5"
    out = subprocess.run([cli, "checkpoint", "inspect", str(ckpt)], capture_output=True, text=True, check=True).stdout
    assert "step        3 (768 tokens seen)" in out and "quant ternary" in out and "; 0 problems" in out
    params = [line.split()[0][len("params/"):] for line in out.splitlines() if line.strip().startswith("params/")]
    matrices = [p for p in params if p.startswith("blocks.") and not p.endswith("_norm")]
    # Each parameter, then its optimizer's state: Muon's one slot for block matrices, AdamW's two for the rest.
    assert out.count(" ok\n") == len(params) + len(matrices) + 2 * (len(params) - len(matrices))

    c = hybrit.load_checkpoint(ckpt)
    assert c["step"] == 3 and c["config"]["model"]["dim"] == 64 and c["tokenizer"]["kind"] == "byte-v1"
    with h5py.File(ckpt, "r") as f:
        for name, value in c["params"].items():
            np.testing.assert_array_equal(value, f["params/" + name][...])
    muon = {n for n in c["params"] if n.startswith("blocks.") and c["params"][n].ndim == 2}
    assert set(c["optimizer"]) == {f"muon_momentum/{n}" for n in muon} | {f"{g}/{n}" for g in ("adam_m", "adam_v") for n in c["params"] if n not in muon}

    # The export: block matrices as 2-bit codes that decode to the checkpoint's ternary weights.
    exported = tmp_path / "model.hyb"
    subprocess.run([cli, "checkpoint", "export", str(ckpt), "--out", str(exported)], check=True, capture_output=True)
    d = hybrit.Dispatcher()
    with h5py.File(exported, "r") as f:
        assert f.attrs["format"] == "hybrit-inference"
        for name, value in c["params"].items():
            if name.startswith("blocks.") and value.ndim == 2:
                q, s = d.quantize_ternary(value)
                packed = f[name + ".packed"]
                assert packed.shape == (value.shape[0], (value.shape[1] + 3) // 4)
                np.testing.assert_array_equal(d.unpack_ternary(packed[...], value.shape[1]), q)
                assert np.float32(packed.attrs["scale"]) == np.float32(s)
            else:
                np.testing.assert_array_equal(f[name][...], value)
    assert exported.stat().st_size < ckpt.stat().st_size / 5

    # keep_best: best.h5 holds the step with the lowest validation loss so far
    vals = {m["step"]: m["val_loss"] for m in metrics(run)}
    assert hybrit.load_checkpoint(run / "best.h5")["step"] == min(vals, key=vals.get)

    # a damaged file: inspect names it and exits 1
    damage(ckpt, "flipped byte")
    r = subprocess.run([cli, "checkpoint", "inspect", str(ckpt)], capture_output=True, text=True)
    assert r.returncode == 1 and "CHECKSUM MISMATCH" in r.stdout and "damaged: dataset params/blocks.0.wq fails its checksum" in r.stderr
    with pytest.raises(RuntimeError, match="fails its checksum"):
        hybrit.load_checkpoint(ckpt)


@pytest.mark.parametrize("how", ["lost datasets", "step attribute", "missing dataset", "tokenizer that does not parse"])
def test_inspect_export_and_load_refuse_a_damaged_checkpoint(cli, tmp_path, how):
    import hybrit

    run = tmp_path / "run"
    train(cli, run, "--set", "train.steps=2")
    ckpt = run / "ckpt-00000002.h5"
    damage(ckpt, how)
    message = MESSAGES[how]
    r = subprocess.run([cli, "checkpoint", "inspect", str(ckpt)], capture_output=True, text=True)
    assert r.returncode == 1 and message in r.stdout + r.stderr, r.stdout + r.stderr
    out = tmp_path / "model.hyb"
    r = subprocess.run([cli, "checkpoint", "export", str(ckpt), "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 1 and message in r.stderr and not out.exists(), r.stderr
    with pytest.raises(RuntimeError, match=message.split(" (")[0].replace("(", r"\(")):
        hybrit.load_checkpoint(ckpt)


def test_a_damaged_export_is_refused(cli, tmp_path):
    run = tmp_path / "run"
    train(cli, run, "--set", "train.steps=2")
    exported = tmp_path / "model.hyb"
    subprocess.run([cli, "checkpoint", "export", str(run / "ckpt-00000002.h5"), "--out", str(exported)], check=True, capture_output=True)
    with h5py.File(exported, "r+") as f:
        f["blocks.0.wq.packed"].attrs["scale"] = np.float32(f["blocks.0.wq.packed"].attrs["scale"] * 2)
    r = subprocess.run([cli, "generate", "--checkpoint", str(exported), "--prompt", "a", "--max-tokens", "2"], capture_output=True, text=True)
    assert r.returncode == 1 and "blocks.0.wq.packed: its scale and column count fail their checksum" in r.stderr, r.stderr
    with h5py.File(exported, "r+") as f:
        f.attrs["step"] = np.int64(7)
    r = subprocess.run([cli, "generate", "--checkpoint", str(exported), "--prompt", "a", "--max-tokens", "2"], capture_output=True, text=True)
    assert r.returncode == 1 and "the metadata (step, seed, config, tokenizer) fails its checksum" in r.stderr, r.stderr
