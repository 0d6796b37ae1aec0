"""`mpirun -np N hybrit train`: data-parallel ranks train the model one process trains.

Every run here is a real job of N processes started by Open MPI's mpirun on this machine
(oversubscribed when N exceeds the cores). One process is the reference: N ranks at the same
global batch must give the same losses and parameters within float tolerance (the gradient sums
add in another order), and the same N twice the same bits.
"""
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
# Small and quick; batch 6 splits 3/3 over 2 ranks and 2/2/2 over 3; batch 5 splits 2/3 and 1/2/2.
RUN = ["--set", "model.n_layers=2", "--set", "model.dim=64", "--set", "train.batch=6", "--set", "train.eval_batches=2",
       "--set", "train.sample_tokens=0", "--set", "train.eval_every=2"]
FULL_PRECISION = ["--set", "model.quant=none"]


def env():
    e = {k: v for k, v in os.environ.items() if not k.startswith("HYBRIT_")}
    e["HYBRIT_THREADS"] = "1"  # one thread a rank: the CI machine has two cores
    return e


@pytest.fixture(scope="module")
def mpirun(cli):
    info = json.loads(subprocess.run([cli, "info", "--json"], capture_output=True, text=True, check=True).stdout)
    if not info["mpi"]["built"]:
        pytest.skip("this hybrit was built without MPI (apt-get install libopenmpi-dev openmpi-bin, then configure again)")
    path = shutil.which("mpirun")
    assert path, "hybrit was built with MPI but mpirun is not on PATH (apt-get install openmpi-bin)"
    # As root in CI; oversubscribed for 3 ranks on 2 cores; no single-copy shared memory (it needs
    # ptrace rights a container may not grant).
    return [path, "--allow-run-as-root", "--oversubscribe", "--mca", "btl_vader_single_copy_mechanism", "none"]


def train(cli, mpirun, ranks, out, *args, check=True, config=True):
    command = ([*mpirun, "-np", str(ranks)] if ranks > 1 else []) + [cli, "train"] + ([TINY] if config else []) + ["--out", str(out), *RUN, *args]
    r = subprocess.run(command, capture_output=True, text=True, env=env(), timeout=600)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def parameters(checkpoint):
    with h5py.File(checkpoint, "r") as f:
        out = {}
        f["params"].visititems(lambda name, d: out.__setitem__(name, d[()]) if isinstance(d, h5py.Dataset) else None)
        return out


def assert_close_runs(a, b, loss_rtol, param_rtol):
    la, lb = metrics(a), metrics(b)
    assert [m["step"] for m in la] == [m["step"] for m in lb]
    np.testing.assert_allclose([m["loss"] for m in la], [m["loss"] for m in lb], rtol=loss_rtol)
    np.testing.assert_allclose([m["val_loss"] for m in la if "val_loss" in m], [m["val_loss"] for m in lb if "val_loss" in m], rtol=loss_rtol)
    step = la[-1]["step"]
    pa, pb = parameters(a / f"ckpt-{step:08d}.h5"), parameters(b / f"ckpt-{step:08d}.h5")
    assert pa.keys() == pb.keys() and len(pa) > 10
    for name in pa:
        scale = max(np.abs(pa[name]).max(), 1e-6)
        assert np.abs(pa[name] - pb[name]).max() <= param_rtol * scale, name


def test_ranks_train_the_model_one_process_trains(cli, mpirun, tmp_path):
    # Full precision: only the order of the sums differs, so the runs stay within 1e-5 over the steps.
    train(cli, mpirun, 1, tmp_path / "one", "--set", "train.steps=6", *FULL_PRECISION)
    for ranks in (2, 3):
        train(cli, mpirun, ranks, tmp_path / f"n{ranks}", "--set", "train.steps=6", *FULL_PRECISION)
        assert_close_runs(tmp_path / "one", tmp_path / f"n{ranks}", loss_rtol=1e-5, param_rtol=1e-4)


def test_uneven_splits_and_ternary_weights(cli, mpirun, tmp_path):
    # Batch 5 over 2 and 3 ranks: 2/3 and 1/2/2 rows. Ternary: a last-bit difference can move an
    # int8 activation by one step, so the tolerance is the quantizer's (1/127), not float's.
    args = ["--set", "train.steps=4", "--set", "train.batch=5"]
    train(cli, mpirun, 1, tmp_path / "one", *args)
    for ranks in (2, 3):
        train(cli, mpirun, ranks, tmp_path / f"n{ranks}", *args)
        assert_close_runs(tmp_path / "one", tmp_path / f"n{ranks}", loss_rtol=2e-3, param_rtol=2e-2)


def test_the_same_ranks_repeat_bit_for_bit(cli, mpirun, tmp_path):
    for name in ("a", "b"):
        train(cli, mpirun, 2, tmp_path / name, "--set", "train.steps=4", "--set", "train.grad_accum=3")
    assert [m["loss"] for m in metrics(tmp_path / "a")] == [m["loss"] for m in metrics(tmp_path / "b")]
    pa, pb = parameters(tmp_path / "a" / "ckpt-00000004.h5"), parameters(tmp_path / "b" / "ckpt-00000004.h5")
    for name in pa:
        assert np.array_equal(pa[name], pb[name]), name


def test_rank_zero_alone_writes_and_reports(cli, mpirun, tmp_path):
    one = train(cli, mpirun, 1, tmp_path / "one", "--set", "train.steps=2", "--set", "train.sample_tokens=8")
    two = train(cli, mpirun, 2, tmp_path / "two", "--set", "train.steps=2", "--set", "train.sample_tokens=8")
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == sorted(p.name for p in (tmp_path / "two").iterdir())
    assert two.stdout.count("done after 2 steps") == 1 and two.stdout.count("A sample from the model") == 1, two.stdout
    assert "data-parallel over 2 ranks" in two.stderr
    assert "[rank 1] info" not in two.stderr  # the other ranks only warn and fail
    assert len(metrics(tmp_path / "two")) == 2 and one.returncode == 0


def test_a_run_saved_with_n_ranks_resumes_with_m(cli, mpirun, tmp_path):
    train(cli, mpirun, 1, tmp_path / "one", "--set", "train.steps=6", *FULL_PRECISION)
    run = tmp_path / "moved"
    train(cli, mpirun, 2, run, "--set", "train.steps=2", *FULL_PRECISION)
    train(cli, mpirun, 3, run, "--set", "train.steps=4", "--resume", "auto", *FULL_PRECISION)
    r = train(cli, mpirun, 1, run, "--set", "train.steps=6", "--resume", "auto", *FULL_PRECISION)
    assert "resumed from" in r.stderr and [m["step"] for m in metrics(run)] == [1, 2, 3, 4, 5, 6]
    assert_close_runs(tmp_path / "one", run, loss_rtol=1e-5, param_rtol=1e-4)


def rank_pids(job):
    # {rank: pid}: mpirun's children are the ranks (Open MPI starts them directly on the local
    # machine), each with its rank in OMPI_COMM_WORLD_RANK.
    ranks = {}
    for pid in subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split():
        with open(f"/proc/{pid}/environ", "rb") as f:
            variables = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        ranks[int(variables[b"OMPI_COMM_WORLD_RANK"])] = int(pid)
    return ranks


def start_long_run(cli, mpirun, run):
    command = [*mpirun, "-np", "2", cli, "train", TINY, "--out", str(run), *RUN, "--set", "train.steps=100000"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())


def wait_for_steps(job, run, steps, deadline_s=300):
    # Until metrics.jsonl holds `steps` lines: an event, however slow the machine.
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        assert job.poll() is None, job.communicate()
        if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= steps:
            return
        time.sleep(0.05)
    job.kill()
    pytest.fail(f"no {steps} steps in {deadline_s} s")


def test_sigterm_on_one_rank_saves_and_stops_every_rank(cli, mpirun, tmp_path):
    run = tmp_path / "run"
    job = start_long_run(cli, mpirun, run)
    wait_for_steps(job, run, 3)
    pids = rank_pids(job)
    assert sorted(pids) == [0, 1], pids
    os.kill(pids[1], signal.SIGTERM)
    out, err = job.communicate(timeout=300)
    assert job.returncode == 0, out + err
    assert out.count("stopped after") == 1, out
    last = metrics(run)[-1]["step"]
    assert (run / f"ckpt-{last:08d}.h5").exists()
    r = train(cli, mpirun, 1, run, "--set", f"train.steps={last + 2}", "--resume", "auto")
    assert f"at step {last}" in r.stderr and metrics(run)[-1]["step"] == last + 2


def test_a_killed_rank_ends_the_job_naming_it(cli, mpirun, tmp_path):
    run = tmp_path / "run"
    job = start_long_run(cli, mpirun, run)
    wait_for_steps(job, run, 2)
    pids = rank_pids(job)
    os.kill(pids[1], signal.SIGKILL)
    out, err = job.communicate(timeout=300)  # never a hang: mpirun ends the other rank
    assert job.returncode != 0
    assert "rank 1" in out + err and "signal 9" in out + err, out + err


def test_a_failing_rank_ends_the_job_with_its_message(cli, mpirun, tmp_path):
    # Every rank refuses before MPI has started: the launcher ends the job on the exit code.
    r = train(cli, mpirun, 3, tmp_path / "run", "--set", "train.batch=2", check=False)
    assert r.returncode != 0 and "train.batch is 2 but the job has 3 ranks" in r.stderr, r.stderr
    # A run folder already in use: refused on every rank, nothing written to it.
    train(cli, mpirun, 1, tmp_path / "used", "--set", "train.steps=1")
    before = (tmp_path / "used" / "metrics.jsonl").read_text()
    r = train(cli, mpirun, 2, tmp_path / "used", "--set", "train.steps=1", check=False)
    assert r.returncode != 0 and "already holds a run" in r.stderr and "rank 0 of 2" in r.stderr, r.stderr
    assert (tmp_path / "used" / "metrics.jsonl").read_text() == before


def test_other_commands_say_they_run_in_one_process(cli, mpirun, tmp_path):
    r = subprocess.run([*mpirun, "-np", "2", cli, "dispatch-report", "--quick", "--save", str(tmp_path / "p.yaml")],
                       capture_output=True, text=True, env=env(), timeout=300)
    assert r.returncode != 0 and "hybrit dispatch-report runs in one process" in r.stderr, r.stderr
    assert not (tmp_path / "p.yaml").exists()
    r = subprocess.run([*mpirun, "-np", "2", cli, "info"], capture_output=True, text=True, env=env(), timeout=300)
    assert r.returncode == 0 and "rank 0 of 2" in r.stdout and "rank 1 of 2" in r.stdout, r.stdout


# --- mpirun hybrit reduce ---------------------------------------------------------------------

REDUCE = os.path.join(ROOT, "configs", "reduce.yaml")
# Two fortune files, about 2,200 records: uneven shares over 2 and 3 ranks.
SMALL_CORPUS = "--set", "data.sources=[/usr/share/games/fortunes/computers,/usr/share/games/fortunes/cookie]"


def reduce(cli, mpirun, ranks, out, *args, check=True):
    # One backend for every op (--backend c), so one process and the ranks run the same kernels:
    # left to choose, the dispatcher can give one process's larger matmuls to tbb, whose float sums
    # differ from c's in the last bits.
    command = ([*mpirun, "-np", str(ranks)] if ranks > 1 else []) + [cli, "reduce", REDUCE, "--backend", "c", "--out", str(out), *SMALL_CORPUS, *args]
    r = subprocess.run(command, capture_output=True, text=True, env=env(), timeout=600)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def selection(out):
    rows = [line.split("\t") for line in (out / "selection.tsv").read_text().splitlines()[1:]]
    return {"cluster": [int(r[1]) for r in rows], "distance": np.array([float(r[2]) for r in rows]),
            "dup_score": np.array([float(r[3]) for r in rows]), "kept": [int(r[4]) for r in rows]}


@pytest.mark.parametrize("ranks, args", [
    # k 12 with at most 32 points per centroid: k-means trains on a sample of 384 records that the
    # ranks hold unevenly.
    (2, ["--set", "clustering.k=12", "--set", "clustering.max_points_per_centroid=32"]),
    (3, ["--set", "clustering.k=12", "--set", "clustering.max_points_per_centroid=32", "--set", "clustering.init=random"]),
    (3, ["--set", "reduce.strategy=semdedup"]),
    (2, ["--set", "reduce.strategy=balanced", "--set", "clustering.k=auto"]),
    (2, ["--set", "reduce.strategy=hard", "--set", "reduce.fraction=0.3"]),
    (3, ["--set", "reduce.strategy=random"]),
])
def test_reduce_over_ranks_writes_what_one_process_writes(cli, mpirun, tmp_path, ranks, args):
    reduce(cli, mpirun, 1, tmp_path / "one", *args)
    r = reduce(cli, mpirun, ranks, tmp_path / "many", *args)
    one, many = tmp_path / "one", tmp_path / "many"
    corpus = [p.name for p in one.iterdir() if p.name.startswith("corpus.")]
    assert len(corpus) == 1 and (one / corpus[0]).read_bytes() == (many / corpus[0]).read_bytes()
    # The same records kept, the same clusters: every sum that decides them is an integer count or
    # a float sum the ranks add in another order, and here no decision falls on the last bit.
    a, b = selection(one), selection(many)
    assert a["kept"] == b["kept"] and a["cluster"] == b["cluster"]
    np.testing.assert_allclose(a["distance"], b["distance"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a["dup_score"], b["dup_score"], rtol=1e-5, atol=1e-6)
    ra, rb = json.loads((one / "report.json").read_text()), json.loads((many / "report.json").read_text())
    assert ra["ranks"] == 1 and rb["ranks"] == ranks
    assert ra["kept"] == rb["kept"] and ra["clusters"] == rb["clusters"] and ra["near_duplicates"] == rb["near_duplicates"]
    if "kmeans" in ra:
        assert ra["kmeans"]["iterations"] == rb["kmeans"]["iterations"]
        assert rb["kmeans"]["inertia"] == pytest.approx(ra["kmeans"]["inertia"], rel=1e-6)
    # Rank 0 alone writes and reports.
    assert sorted(p.name for p in many.iterdir()) == sorted(p.name for p in one.iterdir())
    assert r.stdout.count("kept ") == 1 and "[rank 1]" not in r.stderr, r.stdout + r.stderr


def test_reduce_over_ranks_repeats_bit_for_bit_on_tbb(cli, mpirun, tmp_path):
    # Left to the dispatcher (tbb where it pays): the same ranks twice give the same bytes.
    for name in ("a", "b"):
        command = [*mpirun, "-np", "2", cli, "reduce", REDUCE, "--out", str(tmp_path / name), *SMALL_CORPUS, "--set", "reduce.strategy=semdedup"]
        r = subprocess.run(command, capture_output=True, text=True, env=env(), timeout=600)
        assert r.returncode == 0, r.stderr
    assert (tmp_path / "a" / "selection.tsv").read_bytes() == (tmp_path / "b" / "selection.tsv").read_bytes()


def test_reduce_over_ranks_with_model_embeddings(cli, mpirun, tmp_path):
    train(cli, mpirun, 1, tmp_path / "model", "--set", "train.steps=2", "--set", "model.context=32")
    ckpt = str(tmp_path / "model" / "ckpt-00000002.h5")
    args = ["--set", "embedding.kind=model", "--set", f"embedding.checkpoint={ckpt}", "--set", "embedding.max_tokens=64",
            "--set", "clustering.k=8", "--set", "reduce.strategy=semdedup", "--set", "reduce.fraction=0.5"]
    reduce(cli, mpirun, 1, tmp_path / "one", *args)
    reduce(cli, mpirun, 2, tmp_path / "two", *args)
    a, b = selection(tmp_path / "one"), selection(tmp_path / "two")
    # Each record's vector comes from its own forward passes on either side; the passes batch
    # other windows beside it, which may move the last bits.
    # The same partition (up to the clusters' numbering) and nearly the same records kept.
    from sklearn.metrics import adjusted_rand_score
    assert sum(a["kept"]) == sum(b["kept"])
    assert adjusted_rand_score(a["cluster"], b["cluster"]) > 0.9
    assert np.mean(np.array(a["kept"]) == np.array(b["kept"])) > 0.9


def test_reduce_over_ranks_refuses_clearly(cli, mpirun, tmp_path):
    # More ranks than records: every rank refuses alike.
    one = tmp_path / "one.txt"
    one.write_text("only one record here\n")
    r = subprocess.run([*mpirun, "-np", "2", cli, "reduce", REDUCE, "--out", str(tmp_path / "r"), "--set", f"data.sources=[{one}]",
                        "--set", "clustering.k=1"], capture_output=True, text=True, env=env(), timeout=300)
    assert r.returncode != 0 and "1 records for 2 ranks" in r.stderr, r.stderr
    assert not (tmp_path / "r").exists()
    # An output folder that holds a reduction: rank 0 refuses, the job ends, the folder is unchanged.
    reduce(cli, mpirun, 1, tmp_path / "done", "--set", "reduce.strategy=random")
    before = {p.name: p.read_bytes() for p in (tmp_path / "done").iterdir()}
    r = reduce(cli, mpirun, 2, tmp_path / "done", "--set", "reduce.strategy=random", check=False)
    assert r.returncode != 0 and "already holds a reduction" in r.stderr and "rank 0 of 2" in r.stderr, r.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "done").iterdir()} == before


def test_reduce_over_ranks_repairs_empty_clusters_as_one_process(cli, mpirun, tmp_path):
    # Many copies of a few records and random initial centroids: centroids drawn on copies of one
    # record tie, all but one of them end up empty, and the repair moves them to the points
    # farthest from their centroids, which the ranks offer from their own shares.
    records = [f"the same line number {i % 3}" for i in range(60)] + [f"a different line {i} with {'x' * i}" for i in range(30)]
    corpus = tmp_path / "dups.txt"
    corpus.write_text("\n".join(records) + "\n")
    args = ["--set", f"data.sources=[{corpus}]", "--set", "clustering.k=12", "--set", "clustering.init=random", "--set", "seed=3"]
    reduce(cli, mpirun, 1, tmp_path / "one", *args)
    reduce(cli, mpirun, 3, tmp_path / "three", *args)
    a, b = selection(tmp_path / "one"), selection(tmp_path / "three")
    assert a["kept"] == b["kept"] and a["cluster"] == b["cluster"]
    assert len(set(a["cluster"])) == 12  # every cluster holds records after the repair


def test_info_says_whether_mpi_takes_device_buffers(cli, mpirun):
    # hybrit's answer (MPIX_Query_cuda_support) against Open MPI's own description of its build.
    info = json.loads(subprocess.run([cli, "info", "--json"], capture_output=True, text=True, check=True).stdout)
    ompi_info = shutil.which("ompi_info")
    if not ompi_info:
        pytest.skip("ompi_info is not on PATH (openmpi-bin installs it)")
    built = subprocess.run([ompi_info, "--parsable", "--all"], capture_output=True, text=True).stdout
    line = next(x for x in built.splitlines() if "built_with_cuda_support:value:" in x)
    assert info["mpi"]["cuda_aware"] == line.endswith(":true"), line
