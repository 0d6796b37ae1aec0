"""The user's own workflow through the CLI and Python: their text -> train -> eval -> generate/chat
-> plot, resuming a run by its folder, and the CLI habits (did you mean, flags after the
subcommand, short forms, stdin prompts, an interactive loop)."""
import json
import math
import os
import re
import subprocess

import numpy as np
import pytest
import yaml

import hybrit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
LICENSES = "/usr/share/common-licenses"
QUICK = ["--set", "model.n_layers=1", "--set", "model.dim=64", "--set", "train.batch=4", "--set", "train.eval_batches=2",
         "--set", "train.sample_tokens=0"]


def run(cli, *args, check=True, input=None, env=None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HYBRIT_")}
    full_env.update(env or {})
    r = subprocess.run([cli, *args], capture_output=True, text=True, env=full_env, timeout=600, input=input)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def own_text(tmp_path_factory):
    """A user's own files: one with paragraphs, one with a sentence per line (no blank lines)."""
    d = tmp_path_factory.mktemp("own")
    with open(os.path.join(LICENSES, "GPL-3")) as f:
        (d / "gpl.txt").write_text(f.read())
    with open(os.path.join(LICENSES, "Apache-2.0")) as f:
        lines = [line.strip() for line in f if line.strip()]
    (d / "apache-lines.txt").write_text("\n".join(lines) + "\n")
    with open(os.path.join(LICENSES, "MPL-2.0")) as f:
        (d / "held-out.txt").write_text(f.read())
    return d


@pytest.fixture(scope="module")
def trained_run(cli, own_text, tmp_path_factory):
    folder = tmp_path_factory.mktemp("run") / "own"
    run(cli, "train", TINY, "--out", str(folder), *QUICK, "--set", "train.steps=30", "--set", "train.eval_every=10",
        "--set", f"data.sources=[{own_text / 'gpl.txt'}, {own_text / 'apache-lines.txt'}]", "--set", f"data.val_sources={own_text / 'held-out.txt'}")
    return folder


def test_own_text_trains_with_the_shipped_config(cli, own_text, tmp_path):
    # tiny.yaml's format is auto: a text file is paragraphs, a file without blank lines is one
    # record per line; the log says how each file was read.
    folder = tmp_path / "run"
    r = run(cli, "train", TINY, "--out", str(folder), *QUICK, "--set", "train.steps=2", "--set", f"data.sources={own_text / 'apache-lines.txt'}")
    assert "done after 2 steps" in r.stdout
    corpus = hybrit.read_corpus([str(own_text / "gpl.txt"), str(own_text / "apache-lines.txt")])
    (fmt_a, why_a, n_a), (fmt_b, why_b, n_b) = corpus["file_formats"]
    assert (fmt_a, fmt_b) == ("text", "lines") and "blank lines" in why_a and "one record per line" in why_b
    assert n_b == len((own_text / "apache-lines.txt").read_text().splitlines())


def test_a_corpus_too_small_to_split_says_how_it_was_read(cli, tmp_path):
    tiny = tmp_path / "one.txt"
    tiny.write_text("a single line of text that is all there is\n")
    r = run(cli, "train", TINY, "--out", str(tmp_path / "run"), *QUICK, "--set", f"data.sources={tiny}", check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert f"Read as: {tiny}: text (auto: a single line), 1 record" in r.stderr
    assert "the whole corpus is one record" in r.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_val_sources_hold_the_validation_set(trained_run, own_text):
    lines = metrics(trained_run)
    assert [m["step"] for m in lines if "val_loss" in m] == [10, 20, 30]
    assert all(m["tokens"] == m["step"] * 4 * 64 for m in lines)
    resolved = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert resolved["data"]["val_sources"] == [str(own_text / "held-out.txt")]
    assert (trained_run / "tokens-val.bin").exists()


def test_eval_scores_held_out_text_like_the_training_loop(cli, trained_run, own_text):
    # The trainer's validation loss samples windows of the same file; the full evaluation must agree
    # with it loosely and with Python exactly.
    r = run(cli, "eval", "-m", str(trained_run), "--data", str(own_text / "held-out.txt"), "--json")
    e = json.loads(r.stdout)
    records = hybrit.read_corpus([str(own_text / "held-out.txt")])["records"]
    assert e["tokens"] == sum(len(r.encode()) + 1 for r in records) - 1, "every token but the first is scored once"
    assert e["bytes"] == e["tokens"], "byte tokens: each scored token stands for one byte (end of record: a newline)"
    assert e["records"] == len(records) and e["step"] == 30 and e["tokenizer"] == "byte-v1"
    assert math.isclose(e["bits_per_token"], e["loss"] / math.log(2)) and math.isclose(e["perplexity"], math.exp(e["loss"]))
    assert math.isclose(e["bits_per_byte"], e["bits_per_token"])
    val = metrics(trained_run)[-1]["val_loss"]
    assert abs(e["loss"] - val) < 0.5, (e["loss"], val)
    py = hybrit.evaluate(str(trained_run), str(own_text / "held-out.txt"))
    assert py["loss"] == e["loss"] and py["tokens"] == e["tokens"]
    human = run(cli, "eval", "--checkpoint", str(trained_run), "-d", str(own_text / "held-out.txt")).stdout
    assert "perplexity" in human and "per byte" in human and "held-out.txt: text" in human


def test_eval_matches_the_model_forward_window_by_window(trained_run, own_text):
    # hybrit.evaluate against Model.from_checkpoint's forward over the same windows.
    model = hybrit.Model.from_checkpoint(str(trained_run))
    assert model.step == 30 and model.config["dim"] == 64
    corpus = hybrit.read_corpus([str(own_text / "held-out.txt")])
    stream = []
    for record in corpus["records"]:
        stream += list(record.encode()) + [256]
    ctx = model.config["context"]
    n = min(len(stream) - 1, 5 * ctx + 17)
    nats = 0.0
    for start in range(0, n, ctx):
        end = min(start + ctx, n)
        x = np.array([stream[start:end]], dtype=np.int32)
        y = np.array([stream[start + 1:end + 1]], dtype=np.int32)
        nats += model.forward(x, y) * (end - start)
    e = hybrit.evaluate(str(trained_run), [str(own_text / "held-out.txt")], max_tokens=n, batch=2)
    assert e["tokens"] == n and e["windows"] == 6
    assert math.isclose(e["loss"], nats / n, rel_tol=1e-6)


def test_eval_bad_input_is_one_line(cli, trained_run, tmp_path):
    r = run(cli, "eval", "-m", str(trained_run), "--data", "/nonexistent.txt", check=False)
    assert r.returncode == 1 and "/nonexistent.txt: no such file or folder" in r.stderr and r.stderr.count("\n") == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run(cli, "eval", "-m", str(empty), "--data", TINY, check=False)
    assert r.returncode == 1 and "no valid checkpoint" in r.stderr


def test_generate_takes_a_run_folder_stdin_and_short_flags(cli, trained_run):
    ckpt = sorted(trained_run.glob("ckpt-*.h5"))[-1]
    a = run(cli, "generate", "-m", str(trained_run), "-p", "The ", "-n", "12", "--temperature", "0")
    b = run(cli, "generate", "--checkpoint", str(ckpt), "--prompt", "-", "--max-tokens", "12", "--temperature", "0", input="The ")
    assert a.stdout == b.stdout and a.stdout.startswith("The ")
    assert "12 tokens" in a.stderr


def test_generate_interactive_answers_each_line(cli, trained_run):
    g = hybrit.Generator(str(trained_run / "ckpt-00000030.h5"))
    r = run(cli, "generate", "-m", str(trained_run), "-i", "-n", "6", "--temperature", "0", input="The \nA \n")
    want = "".join(g.generate(p, max_tokens=6, temperature=0)["text"] + "\n" for p in ("The ", "A "))
    assert r.stdout == want
    chat = run(cli, "generate", "-m", str(trained_run), "-i", "--chat", "-n", "6", "--temperature", "0", input="hello\n")
    first = g.generate("User: hello\nAssistant:", max_tokens=6, temperature=0, stop=["\nUser:"])["text"]
    assert chat.stdout == first + "\n"
    bad = run(cli, "generate", "-m", str(trained_run), "--chat", "-p", "x", check=False)
    assert bad.returncode == 1 and "--chat goes with --interactive" in bad.stderr


def test_resume_by_run_folder_uses_its_config_and_continues_the_clock(cli, own_text, tmp_path):
    folder = tmp_path / "run"
    sources = f"data.sources={own_text / 'gpl.txt'}"
    run(cli, "train", TINY, "--out", str(folder), *QUICK, "--set", "train.steps=4", "--set", sources)
    first = metrics(folder)
    r = run(cli, "train", "--resume", str(folder), "--set", "train.steps=7")
    assert "resumed from" in r.stderr and "done after 7 steps" in r.stdout
    lines = metrics(folder)
    assert [m["step"] for m in lines] == list(range(1, 8))
    assert lines[4]["elapsed_s"] >= first[-1]["elapsed_s"], "elapsed_s continues across the resume"
    assert "for the whole run since step 0" in r.stderr
    # The same run in one go gives the same losses (exact resume).
    other = tmp_path / "straight"
    run(cli, "train", TINY, "--out", str(other), *QUICK, "--set", "train.steps=7", "--set", sources)
    assert [m["loss"] for m in metrics(other)] == [m["loss"] for m in lines]
    bad = run(cli, "train", "--resume", str(folder), "--out", str(other), check=False)
    assert bad.returncode == 1 and "drop --out" in bad.stderr
    missing = run(cli, "train", check=False)
    assert missing.returncode == 1 and "--resume RUN_DIR" in missing.stderr


def test_a_run_draws_its_loss_curves_and_plot_overlays_runs(cli, trained_run, tmp_path):
    png = trained_run / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10000
    out = tmp_path / "both.png"
    r = run(cli, "plot", str(trained_run), str(trained_run), "-o", str(out))
    assert out.read_bytes()[:4] == b"\x89PNG" and str(out) in r.stdout
    bad = run(cli, "plot", str(tmp_path), check=False)
    assert bad.returncode == 1 and "no metrics.jsonl" in bad.stderr
    # Without matplotlib (a Python that lacks it) a run still finishes and says why there is no plot.
    no_mpl = tmp_path / "nompl"
    r = run(cli, "train", TINY, "--out", str(no_mpl), *QUICK, "--set", "train.steps=1", env={"HYBRIT_PYTHON": "/bin/false"})
    assert "loss curves not drawn" in r.stderr and not (no_mpl / "loss.png").exists()


def test_resolved_config_has_no_float_noise(trained_run):
    text = (trained_run / "config.yaml").read_text()
    assert "val_fraction: 0.05\n" in text and "0000000" not in text
    assert yaml.safe_load(text)["optim"]["adamw"]["lr"] == 0.003


@pytest.mark.parametrize("args, message", [
    (["trian", TINY], "unknown command 'trian'; did you mean 'train'?"),
    (["genrate"], "unknown command 'genrate'; did you mean 'generate'?"),
    (["generate", "-m", TINY, "--promt", "x"], "unknown option --promt for `hybrit generate`; did you mean --prompt?"),
    (["train", TINY, "--stpes", "3"], "unknown option --stpes for `hybrit train`"),
    (["checkpoint", "inspect", "x.h5", "--jsn"], "unknown option --jsn for `hybrit checkpoint inspect`"),
])
def test_typos_get_a_suggestion_and_exit_2(cli, args, message):
    r = run(cli, *args, check=False)
    assert r.returncode == 2 and r.stderr.startswith("hybrit: error: " + message), r.stderr


def test_global_flags_work_after_the_subcommand(cli, trained_run):
    before = run(cli, "--backend", "c", "generate", "-m", str(trained_run), "-p", "x", "-n", "3", "--seed", "1")
    after = run(cli, "generate", "-m", str(trained_run), "-p", "x", "-n", "3", "--seed", "1", "--backend", "c")
    assert before.stdout == after.stdout
    bad = run(cli, "generate", "-m", str(trained_run), "-p", "x", "--backend", "gpu", check=False)
    assert bad.returncode == 1 and "--backend: expected c, tbb or cuda" in bad.stderr


def test_the_reduce_hint_trains_on_a_reduced_text_file(cli, own_text, tmp_path):
    # `hybrit reduce` on the user's own text, then the command it prints, as printed.
    out = tmp_path / "half"
    r = run(cli, "reduce", os.path.join(ROOT, "configs", "reduce.yaml"), "-o", str(out), "--set", f"data.sources=[{own_text / 'apache-lines.txt'}]",
            "--set", "clustering.k=8")
    hint = re.search(r"train on it with: hybrit (train \S+ --set \S+)", r.stdout)
    assert hint, r.stdout
    args = hint.group(1).split()
    args[1] = TINY  # the hint names configs/tiny.yaml relative to the repository
    trained = run(cli, *args, "--out", str(tmp_path / "run"), *QUICK, "--set", "train.steps=2")
    assert "done after 2 steps" in trained.stdout
    assert (out / "corpus.lines.txt").exists()
