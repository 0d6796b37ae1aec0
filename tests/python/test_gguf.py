"""`hybrit checkpoint export --format gguf`: the file llama.cpp runs, read back by hybrit itself and,
where llama.cpp's own Python reader (gguf-py) is importable, by it."""
import os
import subprocess

import numpy as np
import pytest

import hybrit

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs", "tiny.yaml")
BITNET = ["--set", "model.dim=256", "--set", "model.n_layers=1", "--set", "model.subln=true", "--set", "model.tied_embeddings=true",
          "--set", "model.ffn_hidden=512", "--set", "model.context=32", "--set", "train.steps=3", "--set", "train.batch=2",
          "--set", "train.sample_tokens=0", "--set", "train.eval_batches=1"]


def run(cli, *args, check=True):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYBRIT_")}
    r = subprocess.run([cli, *args], capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def run_dir(cli, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "run"
    run(cli, "train", TINY, "--out", str(out), *BITNET)
    return out


def test_generate_from_the_gguf_equals_the_checkpoint(cli, run_dir, tmp_path):
    gguf = tmp_path / "model.gguf"
    r = run(cli, "checkpoint", "export", str(run_dir), "-o", str(gguf))
    assert "architecture bitnet" in r.stdout and gguf.stat().st_size > 0
    texts = {run(cli, "generate", "-m", str(m), "-p", "Once upon a", "-n", "40", "--temperature", "0").stdout for m in (run_dir, gguf)}
    assert len(texts) == 1, texts
    # The Python engine reads it too, with the checkpoint's logits.
    a, b = hybrit.Generator(str(gguf)), hybrit.Generator(str(next(run_dir.glob("ckpt-*.h5"))))
    prompt = list(b"A fortune: ")
    np.testing.assert_array_equal(a.last_logits(prompt), b.last_logits(prompt))


def test_export_refusals_are_one_line_and_write_nothing(cli, tmp_path):
    out = tmp_path / "relu"
    run(cli, "train", TINY, "--out", str(out), *BITNET, "--set", "model.ffn=relu2")
    r = run(cli, "checkpoint", "export", str(out), "-o", str(tmp_path / "m.gguf"), check=False)
    assert r.returncode == 1 and "model.ffn: swiglu" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "m.gguf").exists()
    r = run(cli, "checkpoint", "export", str(out), "-o", str(tmp_path / "m.gguf"), "--type", "q4_0", check=False)
    assert r.returncode == 1 and "--type" in r.stderr and "tq2_0" in r.stderr, r.stderr
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    r = run(cli, "generate", "-m", str(junk), "-p", "x", "-n", "1", check=False)
    assert r.returncode == 1 and "junk.gguf" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_llama_cpps_own_reader_reads_it(cli, run_dir, tmp_path):
    gguf_py = pytest.importorskip("gguf", reason="llama.cpp's gguf-py is not importable here (PYTHONPATH=LLAMA_CPP/gguf-py runs this check)")
    path = tmp_path / "model.gguf"
    run(cli, "checkpoint", "export", str(run_dir), "-o", str(path))
    reader = gguf_py.GGUFReader(str(path))
    fields = {name: f for name, f in reader.fields.items()}
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "bitnet"
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf_py.GGMLQuantizationType.TQ2_0
    assert tensors["token_embd.weight"].tensor_type == gguf_py.GGMLQuantizationType.F32
    # gguf-py's own TQ2_0 dequantizer gives ternary values.
    q = gguf_py.quants.dequantize(tensors["blk.0.ffn_up.weight"].data, gguf_py.GGMLQuantizationType.TQ2_0)
    assert set(np.unique(q)) <= {-1.0, 0.0, 1.0}


def test_export_from_python(run_dir, tmp_path):
    ckpt = str(next(run_dir.glob("ckpt-*.h5")))
    r = hybrit.export_checkpoint(str(run_dir), str(tmp_path / "m.gguf"), type="tq1_0")
    assert r["format"] == "gguf" and r["architecture"] == "bitnet" and r["bytes"] == (tmp_path / "m.gguf").stat().st_size
    r = hybrit.export_checkpoint(ckpt, str(tmp_path / "m.hyb"))
    assert r["format"] == "hyb" and r["weight_bytes"] > 0
    prompt = list(b"Q: ")
    np.testing.assert_array_equal(hybrit.Generator(str(tmp_path / "m.gguf")).last_logits(prompt), hybrit.Generator(str(tmp_path / "m.hyb")).last_logits(prompt))
    with pytest.raises(ValueError, match="format: expected auto, hyb or gguf"):
        hybrit.export_checkpoint(ckpt, str(tmp_path / "x"), format="onnx")
