"""hybrit.train and hybrit.Trainer from Python."""
import os

import numpy as np
import pytest

import hybrit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = {
    "seed": 3,
    "model": {"dim": 32, "n_layers": 1, "n_heads": 2, "context": 32, "quant": "ternary"},
    "data": {"sources": ["/usr/share/games/fortunes"], "format": "fortune"},
    "train": {"steps": 4, "batch": 4, "eval_batches": 2, "eval_every": 2, "sample_tokens": 16},
}


@pytest.fixture(autouse=True)
def fortunes():
    if not os.path.isdir("/usr/share/games/fortunes"):
        pytest.skip("Debian's fortunes package is not installed")


def test_trainer_steps_evaluates_samples_and_exposes_views(tmp_path):
    t = hybrit.Trainer(SMALL, cache_dir=str(tmp_path))
    params, grads = t.parameters(), t.gradients()
    assert params["blocks.0.wq"].shape == (32, 32)
    before = params["blocks.0.wq"].copy()
    first = t.step()
    assert first["step"] == 1 and first["loss"] > 4 and not first["skipped"]
    assert np.abs(grads["blocks.0.wq"]).sum() > 0           # the views see the gradients
    assert not np.array_equal(before, params["blocks.0.wq"])  # and the update
    for _ in range(3):
        last = t.step()
    assert t.steps_done == 4 and last["loss"] < first["loss"]
    val = t.evaluate()
    assert 0 < val < 6
    text = t.sample(tokens=30, prompt="The ", temperature=0.0)
    assert text.startswith("The ") and len(text.encode()) >= 4
    assert "dim: 32" in t.config_yaml()
    m = t.metrics()  # the dispatcher's: the model's matmuls and quantizers went through it
    assert sum(row["calls"] for row in m["matmul"].values()) > 0
    assert sum(row["calls"] for row in m["quantize_ternary"].values()) > 0
    assert (tmp_path / "tokens.bin").exists()


def test_train_runs_from_a_dict_and_from_a_path(tmp_path):
    r = hybrit.train(SMALL, out=str(tmp_path / "a"))
    assert r["steps"] == 4 and not r["interrupted"] and r["val_loss"] is not None
    assert (tmp_path / "a" / "metrics.jsonl").exists()
    r2 = hybrit.train(os.path.join(ROOT, "configs", "tiny.yaml"), out=str(tmp_path / "b"),
                      sets=["train.steps=2", "model.n_layers=1", "model.dim=32", "train.batch=2", "train.eval_batches=1", "train.sample_tokens=0"])
    assert r2["steps"] == 2 and r2["sample"] == ""


def test_config_errors_are_value_errors():
    with pytest.raises(ValueError, match=r"model.dim \(50\) must be divisible by model.n_heads \(4\)"):
        hybrit.Trainer({"model": {"dim": 50, "n_heads": 4}})
    with pytest.raises(ValueError, match="trian: unknown key"):
        hybrit.Trainer({"trian": {}})
    with pytest.raises(TypeError, match="config must be a path to a YAML file or a dict"):
        hybrit.Trainer(42)


def test_a_bpe_trainer_without_a_run_folder_saves_its_tokenizer(tmp_path):
    # Python's Trainer trains its BPE model in a temporary folder: every checkpoint must still
    # carry the model, so the checkpoint loads and tokenizes as the trainer did.
    t = hybrit.Trainer({"data": {"tokenizer": "bpe", "vocab_size": 600}, "model": {"dim": 32, "n_layers": 1, "n_heads": 2, "context": 16},
                        "train": {"batch": 2, "sample_tokens": 0}})
    t.step()
    path = str(tmp_path / "bpe.h5")
    t.save(path)
    again = hybrit.Model.from_checkpoint(path)
    assert again.config["vocab_size"] > 257  # the BPE vocabulary, not the byte one
    g = hybrit.Generator(path)
    assert g.decode(g.encode("hello world, 42")) == "hello world, 42"
