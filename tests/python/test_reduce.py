"""Data reduction: embeddings against a numpy reference, each strategy's selection checked by brute
force, and `hybrit reduce` end to end (formats round-trip through the training readers)."""
import json
import math
import os
import subprocess

import numpy as np
import pytest

import hybrit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REDUCE = os.path.join(ROOT, "configs", "reduce.yaml")
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
FORTUNES = "/usr/share/games/fortunes"


@pytest.fixture(scope="module")
def fortunes():
    if not os.path.isdir(FORTUNES):
        pytest.skip("the fortunes package is not installed (run.sh installs it)")
    return hybrit.read_corpus([FORTUNES])["records"]


# --- embeddings -------------------------------------------------------------------------------

MASK = (1 << 64) - 1


def fnv1a(data, h):
    for b in data:
        h = ((h ^ b) * 1099511628211) & MASK
    return h


def reference_ngram_embedding(records, dim, char_range, word_range):
    """The documented definition, written out independently."""
    char_tag, word_tag, offset = 0x63686172, 0x776F7264, 1469598103934665603

    def bucket(gram, tag):
        h = fnv1a(gram, offset ^ tag)
        return (h ^ (h >> 32)) % dim

    rows = []
    for rec in records:
        text = bytearray(b" ")
        for b in rec.encode():
            if b in b" \t\n\v\f\r":
                if text[-1] != 32:
                    text.append(32)
            else:
                text.append(b + 32 if 65 <= b <= 90 else b)
        if text[-1] != 32:
            text.append(32)
        counts = {}
        for n in range(char_range[0], char_range[1] + 1):
            for i in range(len(text) - n + 1):
                k = bucket(bytes(text[i:i + n]), char_tag)
                counts[k] = counts.get(k, 0) + 1
        words, i = [], 0
        is_word = lambda c: c >= 0x80 or chr(c).isascii() and chr(c).isalnum()  # noqa: E731
        while i < len(text):
            if not is_word(text[i]):
                i += 1
                continue
            j = i
            while j < len(text) and is_word(text[j]):
                j += 1
            words.append(bytes(text[i:j]))
            i = j
        for n in range(word_range[0], word_range[1] + 1):
            for i in range(len(words) - n + 1):
                k = bucket(b"".join(w + b" " for w in words[i:i + n]), word_tag)
                counts[k] = counts.get(k, 0) + 1
        rows.append(counts)
    df = np.zeros(dim)
    for counts in rows:
        for k in counts:
            df[k] += 1
    idf = np.log((1 + len(records)) / (1 + df)) + 1
    out = np.zeros((len(records), dim))
    for r, counts in enumerate(rows):
        for k, c in counts.items():
            out[r, k] = (1 + math.log(c)) * idf[k]
        norm = np.linalg.norm(out[r])
        if norm > 0:
            out[r] /= norm
    return out


def test_ngram_embedding_matches_the_documented_definition(fortunes, rng):
    records = [fortunes[i] for i in rng.choice(len(fortunes), 120, replace=False)]
    records.append("ÜBER straße — naïve 東京\tTabs   and   CAPS")  # non-ASCII bytes and whitespace runs
    dim = int(rng.choice([64, 257, 1024]))
    ours = hybrit.embed_text(records, dim=dim, char_ngrams=(2, 4), word_ngrams=(1, 2))
    ref = reference_ngram_embedding(records, dim, (2, 4), (1, 2))
    assert ours.shape == (len(records), dim) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_ngram_embedding_folds_case_and_whitespace_and_turns_kinds_off(fortunes):
    a, b = fortunes[0], "  " + fortunes[0].upper().replace(" ", " \n\t ")
    both = hybrit.embed_text([a, b, fortunes[1]], dim=512)
    np.testing.assert_allclose(both[0], both[1], atol=1e-6)
    words_only = hybrit.embed_text(fortunes[:50], dim=512, char_ngrams=(0, 0))
    chars_only = hybrit.embed_text(fortunes[:50], dim=512, word_ngrams=(0, 0))
    assert not np.allclose(words_only, chars_only)
    np.testing.assert_allclose(np.linalg.norm(words_only, axis=1), 1, rtol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    ({"dim": 0}, "embedding.dim"),
    ({"char_ngrams": (3, 2)}, "char_ngrams"),
    ({"char_ngrams": (0, 0), "word_ngrams": (0, 0)}, "no features"),
])
def test_bad_embedding_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        hybrit.embed_text(["some text"], **kwargs)


# --- selection --------------------------------------------------------------------------------

def brute_force_scores(x, labels, distance):
    """SemDeDup's rule: within a cluster ordered farthest first, the highest cosine to any earlier record."""
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
    scores = np.full(len(x), -1.0)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        order = members[np.argsort(-distance[members], kind="stable")]
        sims = unit[order] @ unit[order].T
        for pos in range(1, len(order)):
            scores[order[pos]] = sims[pos, :pos].max()
    return scores


@pytest.fixture
def embedded(fortunes, rng):
    records = [fortunes[i] for i in rng.choice(len(fortunes), 600, replace=False)]
    return records, hybrit.embed_text(records, dim=256)


def test_distances_and_duplicate_scores_match_brute_force(embedded):
    _, x = embedded
    r = hybrit.select(x, "nearest", fraction=0.5, k=8, seed=3)
    km = r["kmeans"]
    expect_dist = ((x.astype(np.float64) - km.centroids[km.labels]) ** 2).sum(axis=1)
    np.testing.assert_allclose(r["distance"], expect_dist, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(r["dup_score"], brute_force_scores(x, km.labels, r["distance"]), atol=2e-5)


@pytest.mark.parametrize("strategy", ["nearest", "hard"])
def test_nearest_and_hard_keep_each_clusters_share_from_the_right_end(embedded, strategy):
    _, x = embedded
    n, target = len(x), 217
    r = hybrit.select(x, strategy, count=target, k=9, seed=5)
    labels, dist, kept = r["kmeans"].labels, r["distance"], r["kept"]
    assert len(kept) == target and np.all(np.diff(kept) > 0)
    sizes = np.bincount(labels, minlength=9)
    np.testing.assert_array_equal(r["cluster_size"], sizes)
    np.testing.assert_array_equal(r["cluster_kept"], np.bincount(labels[kept], minlength=9))
    assert np.all(np.abs(r["cluster_kept"] - target * sizes / n) < 1)  # proportional, rounded
    mask = np.zeros(n, bool)
    mask[kept] = True
    for c in range(9):
        inside, out = dist[mask & (labels == c)], dist[~mask & (labels == c)]
        if len(inside) and len(out):
            if strategy == "nearest":
                assert inside.max() <= out.min()
            else:
                assert inside.min() >= out.max()


def test_balanced_takes_equal_quotas_and_whole_small_clusters(embedded):
    _, x = embedded
    r = hybrit.select(x, "balanced", fraction=0.3, k=12, seed=7)
    sizes, kept = r["cluster_size"], r["cluster_kept"]
    assert kept.sum() == round(0.3 * len(x))
    partial = kept < sizes
    assert partial.any()
    assert kept[partial].max() - kept[partial].min() <= 1
    assert np.all(sizes[~partial] <= kept[partial].max())
    other = hybrit.select(x, "balanced", fraction=0.3, k=12, seed=8)
    assert not np.array_equal(other["kept"], r["kept"])  # random within clusters, by seed


def test_semdedup_removes_injected_duplicates_and_nothing_else(fortunes, rng):
    # The embedding folds ASCII case and whitespace runs only (documented), so that is what
    # "the same text" means here.
    def fold(text):
        return " ".join("".join(c.lower() if c.isascii() else c for c in text).split())

    by_text = {}
    for i in rng.choice(len(fortunes), 400, replace=False):
        by_text.setdefault(fold(fortunes[i]), fortunes[i])
    originals = list(by_text.values())
    copies = ["".join(c.upper() if c.isascii() else c for c in originals[i]) + "  " for i in rng.choice(len(originals), 60, replace=False)]
    records = originals + copies
    order = rng.permutation(len(records))
    records = [records[i] for i in order]
    x = hybrit.embed_text(records, dim=2048)
    r = hybrit.select(x, "semdedup", eps=1e-4, k=6)
    normalised = [fold(rec) for rec in records]
    kept = {normalised[i] for i in r["kept"]}
    assert kept == set(normalised)                 # every distinct text survives ...
    assert len(r["kept"]) == len(set(normalised))  # ... once
    assert r["near_duplicates_removed"] == len(records) - len(r["kept"])


def test_semdedup_with_a_target_drops_the_most_duplicated_first(embedded):
    _, x = embedded
    r = hybrit.select(x, "semdedup", count=450, k=5)
    mask = np.zeros(len(x), bool)
    mask[r["kept"]] = True
    assert mask.sum() == 450
    assert r["dup_score"][mask].max() <= r["dup_score"][~mask].min()
    assert r["eps"] == pytest.approx(1 - r["dup_score"][~mask].min(), abs=1e-6)


def test_random_is_a_seeded_uniform_subset(embedded):
    _, x = embedded
    a = hybrit.select(x, "random", count=100, seed=1)["kept"]
    assert len(np.unique(a)) == 100
    np.testing.assert_array_equal(a, hybrit.select(x, "random", count=100, seed=1)["kept"])
    assert not np.array_equal(a, hybrit.select(x, "random", count=100, seed=2)["kept"])


@pytest.mark.parametrize("kwargs, message", [
    ({"strategy": "nearest"}, "exactly one of fraction, count"),
    ({"strategy": "nearest", "fraction": 0.5, "count": 3}, "got several"),
    ({"strategy": "hard", "eps": 0.1}, "only the semdedup strategy"),
    ({"strategy": "nearest", "fraction": 0.0}, r"reduce.fraction: expected a number in \(0, 1\]"),
    ({"strategy": "nearest", "count": 10**6}, "reduce.count: expected 1 to"),
    ({"strategy": "closest", "fraction": 0.5}, "strategy: expected nearest, balanced, semdedup, hard or random, got .closest."),
    ({"strategy": "nearest", "fraction": 0.5, "k": 10**6}, "k"),
])
def test_bad_selection_requests_are_refused(embedded, kwargs, message):
    _, x = embedded
    strategy = kwargs.pop("strategy")
    with pytest.raises(ValueError, match=message):
        hybrit.select(x, strategy, **kwargs)


def test_nan_embeddings_are_refused(embedded):
    _, x = embedded
    x = x.copy()
    x[17, 3] = np.nan
    with pytest.raises(ValueError, match="17"):
        hybrit.select(x, "nearest", fraction=0.5, k=4)


# --- model-based embeddings ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("embed-model")
    trainer = hybrit.Trainer({"model": {"dim": 32, "n_layers": 1, "n_heads": 2, "context": 16},
                              "train": {"batch": 4, "sample_tokens": 0}})
    for _ in range(3):
        trainer.step()
    path = str(out / "model.h5")
    trainer.save(path)
    return path


def test_model_embedding_is_independent_of_batching_and_windows(checkpoint, fortunes):
    records = fortunes[:40] + ["x", "a record much longer than the model's context of sixteen tokens, cut in windows"]
    one = hybrit.embed_with_checkpoint(records, checkpoint, batch=1)
    many = hybrit.embed_with_checkpoint(records, checkpoint, batch=16)
    assert one.shape == (len(records), 32)
    np.testing.assert_allclose(one, many, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(one, axis=1), 1, rtol=1e-5)
    # max_tokens cuts the record: the byte tokenizer's first 20 tokens are its first 20 bytes
    long = records[-1]
    cut = hybrit.embed_with_checkpoint([long], checkpoint, max_tokens=20)
    np.testing.assert_allclose(cut, hybrit.embed_with_checkpoint([long[:20]], checkpoint), atol=1e-5)
    assert not np.allclose(cut, one[-1:], atol=1e-3)


def test_model_embedding_refuses_a_missing_checkpoint(tmp_path):
    with pytest.raises(OSError, match="nope.h5"):
        hybrit.embed_with_checkpoint(["text"], str(tmp_path / "nope.h5"))


# --- hybrit reduce ------------------------------------------------------------------------------

def run(cli, *args, check=True):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYBRIT_")}
    return subprocess.run([cli, *args], capture_output=True, text=True, env=env, check=check, timeout=600)


def test_reduce_halves_fortunes_and_training_reads_the_result(cli, tmp_path, fortunes):
    out = tmp_path / "half"
    r = run(cli, "reduce", REDUCE, "--out", str(out))
    assert "kept" in r.stdout and "reduced corpus" in r.stdout
    report = json.loads((out / "report.json").read_text())
    n = len(fortunes)
    assert report["input"]["records"] == n and report["kept"] == math.floor(n / 2 + 0.5)
    assert sum(c["size"] for c in report["clusters"]) == n and sum(c["kept"] for c in report["clusters"]) == report["kept"]
    assert report["kmeans"]["k"] == 100 and set(report["seconds"]) >= {"read", "embed", "kmeans", "select", "write", "total"}
    assert "matmul" in report["dispatch_metrics"] and "kmeans_assign" in report["dispatch_metrics"]
    rows = [line.split("\t") for line in (out / "selection.tsv").read_text().splitlines()[1:]]
    kept = [int(row[0]) for row in rows if row[4] == "1"]
    reduced = hybrit.read_corpus([str(out / "corpus.fortune")])
    assert reduced["format"] == "fortune" and reduced["records"] == [fortunes[i] for i in kept]
    # the output folder is never overwritten
    again = run(cli, "reduce", REDUCE, "--out", str(out), check=False)
    assert again.returncode == 1 and "already holds a reduction" in again.stderr
    # and a training run takes the reduced corpus
    t = run(cli, "train", TINY, "--out", str(tmp_path / "run"), "--set", f"data.sources={out / 'corpus.fortune'}", "--set", "train.steps=2",
            "--set", "train.eval_batches=1", "--set", "train.sample_tokens=0")
    assert "done after 2 steps" in t.stdout


@pytest.mark.parametrize("fmt", ["text", "jsonl"])
def test_reduce_writes_the_inputs_format(cli, tmp_path, fortunes, fmt):
    records = fortunes[:300] + ['quotes " and \\ backslashes', "ünïcödé — 東京"]
    if fmt == "text":
        records = [r for r in records if all(line.strip() for line in r.split("\n"))]  # paragraphs hold no blank lines
        src = tmp_path / "in.txt"
        src.write_text("\n\n".join(records) + "\n")
    else:
        src = tmp_path / "in.jsonl"
        src.write_text("".join(json.dumps({"text": r, "id": i}) + "\n" for i, r in enumerate(records)))
    assert hybrit.read_corpus([str(src)])["records"] == records
    out = tmp_path / "out"
    run(cli, "reduce", REDUCE, "--out", str(out), "--set", f"data.sources={src}", "--set", "clustering.k=7",
        "--set", "reduce.strategy=hard", "--set", "reduce.fraction=0.4")
    rows = [line.split("\t") for line in (out / "selection.tsv").read_text().splitlines()[1:]]
    kept = [int(row[0]) for row in rows if row[4] == "1"]
    name = "corpus.txt" if fmt == "text" else "corpus.jsonl"
    reduced = hybrit.read_corpus([str(out / name)])
    assert reduced["format"] == fmt and reduced["records"] == [records[i] for i in kept]
    assert len(kept) == math.floor(0.4 * len(records) + 0.5)


def test_reduce_with_model_embeddings_from_python(tmp_path, checkpoint):
    report = hybrit.reduce({"data": {"sources": [FORTUNES]}, "embedding": {"kind": "model", "checkpoint": checkpoint, "max_tokens": 32},
                            "clustering": {"k": 20}, "reduce": {"strategy": "semdedup", "count": 5000}}, out=str(tmp_path / "m"))
    assert report["kept"] == 5000 and report["embedding"]["kind"] == "model" and 0 <= report["semdedup_eps"] <= 2
    assert (tmp_path / "m" / "corpus.fortune").exists()


@pytest.mark.parametrize("yaml_text, message", [
    ("reduce: {strategy: nearest, fraction: 0.5}\nembedding: {dimm: 5}\n", r"bad.yaml:2: embedding.dimm: unknown key"),
    ("reduce: {fraction: 0.5}\n", "reduce.strategy: missing"),
    ("reduce:\n  strategy: nearest\n", "give the target"),
    ("reduce: {strategy: nearest, fraction: 0.5, count: 4}\n", "give only one of"),
    ("reduce: {strategy: hard, eps: 0.1}\n", "only semdedup keeps by a threshold"),
    ("reduce: {strategy: nearest, fraction: 1.5}\n", r"bad.yaml:1: reduce.fraction: expected a number in \(0, 1\]"),
    ("embedding: {kind: model}\nreduce: {strategy: nearest, fraction: 0.5}\n", "embedding.checkpoint"),
    ("embedding: {char_ngrams: [5, 3]}\nreduce: {strategy: nearest, fraction: 0.5}\n", "bad.yaml:1: embedding.char_ngrams"),
    ("clustering: {k: 0}\nreduce: {strategy: nearest, fraction: 0.5}\n", "bad.yaml:1: clustering.k"),
])
def test_reduce_config_errors_name_file_line_and_key(cli, tmp_path, yaml_text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    r = run(cli, "reduce", str(path), "--out", str(tmp_path / "o"), check=False)
    assert r.returncode == 1, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    import re
    assert re.search(message, r.stderr), r.stderr
    assert not (tmp_path / "o" / "report.json").exists()


def test_reduce_puts_the_environment_over_its_yaml_and_the_flag_over_both(cli, tmp_path):
    base = {k: v for k, v in os.environ.items() if not k.startswith("HYBRIT_")}
    small = ["--set", "clustering.k=8", "--set", "data.sources=/usr/share/common-licenses/GPL-3", "--set", "data.format=text"]
    for name, env, flags, expect in [("env", {"HYBRIT_BACKEND": "tbb"}, [], "tbb"), ("flag", {"HYBRIT_BACKEND": "tbb"}, ["--backend", "c"], "c")]:
        out = tmp_path / name
        subprocess.run([cli, *flags, "reduce", REDUCE, "--out", str(out), "--set", "dispatch.backend=c" if name == "env" else "dispatch.backend=tbb",
                        *small], capture_output=True, text=True, env={**base, **env}, check=True, timeout=600)
        ran = json.loads((out / "report.json").read_text())["dispatch_metrics"]
        assert "kmeans_assign" in ran and all(set(backends) == {expect} for backends in ran.values()), ran
