"""Inference: packed-weight logits against the training forward, batching invariance, sampling,
the paged KV cache (prefix sharing, preemption), stop conditions and `hybrit generate`."""
import os
import re
import subprocess
import threading

import h5py
import numpy as np
import pytest
import yaml

import hybrit


def trained(tmp_path_factory, quant, **model):
    cfg = {"seed": 3, "model": dict({"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "context": 48, "quant": quant}, **model),
           "train": {"batch": 4, "sample_tokens": 0}}
    trainer = hybrit.Trainer(cfg)
    for _ in range(40):
        trainer.step()
    path = str(tmp_path_factory.mktemp(f"inference-{quant}") / "model.h5")
    trainer.save(path)
    return trainer, path


@pytest.fixture(scope="module")
def ternary(tmp_path_factory):
    return trained(tmp_path_factory, "ternary")


@pytest.fixture(scope="module")
def generator(ternary):
    return hybrit.Generator(ternary[1])


PROMPTS = ["The ", "A man walks into a bar", "Q: What is the meaning of life?\nA:", "x", "Never", "You will", "It is", "%"]


# The second shape: a head_dim (10) that is no multiple of the attention kernel's 16 lanes, and 12
# query heads on one KV head (more than the 8 the decode attention takes per call).
@pytest.mark.parametrize("quant", ["ternary", "none"])
@pytest.mark.parametrize("shape", [{}, {"dim": 120, "n_heads": 12, "n_kv_heads": 1}], ids=["gqa2", "gqa12-hd10"])
def test_logits_match_the_training_forward(tmp_path_factory, rng, quant, shape):
    trainer, path = trained(tmp_path_factory, quant, subln=bool(rng.integers(2)), **shape)
    model = hybrit.Model(yaml.safe_load(trainer.config_yaml())["model"])
    params = model.parameters()
    for name, values in trainer.parameters().items():
        params[name][...] = values
    packed, f32 = hybrit.Generator(path), hybrit.Generator(path, packed=False)
    errors = {"packed vs training": [], "f32 vs training": [], "packed vs f32": []}
    for length in [1, 15, 16, 17, 48, 31, 2]:
        tokens = rng.integers(0, 257, length).astype(np.int32)
        model.forward(tokens[None, :], tokens[None, :])
        ref = model.logits()[length - 1]
        scale = max(1.0, float(np.abs(ref).max()))
        a, b = packed.last_logits(tokens), f32.last_logits(tokens)
        errors["packed vs training"].append(float(np.abs(a - ref).max()) / scale)
        errors["f32 vs training"].append(float(np.abs(b - ref).max()) / scale)
        errors["packed vs f32"].append(float(np.abs(a - b).max()) / scale)
    for what, e in errors.items():
        if quant == "none":
            assert max(e) < 2e-4, (what, e)
        else:
            # As in training's check against PyTorch: last-bit differences (online vs. full
            # softmax, integer vs. float dots) can tip an int8 activation across a rounding edge
            # (about 1 sequence in 20 here), which moves logits by up to ~0.5%. Most sequences
            # match to float precision.
            assert max(e) < 3e-2 and np.median(e) < 2e-4, (what, e)


@pytest.mark.parametrize("quant", ["ternary", "none"])
def test_the_export_file_gives_the_same_model(cli, tmp_path_factory, quant):
    _, path = trained(tmp_path_factory, quant, subln=True, ffn="relu2" if quant == "none" else "swiglu")
    export = path.replace(".h5", ".hyb")
    subprocess.run([cli, "checkpoint", "export", path, "--out", export], check=True, capture_output=True, timeout=120)
    tokens = hybrit.Generator(path).encode("The quick brown fox")
    for packed in (True, False):
        a, b = hybrit.Generator(path, packed=packed), hybrit.Generator(export, packed=packed)
        assert a.info == b.info
        np.testing.assert_array_equal(a.last_logits(tokens), b.last_logits(tokens))
        kw = dict(max_tokens=30, temperature=0.8, seed=3)
        assert a.generate(PROMPTS, **kw) == b.generate(PROMPTS, **kw)


def test_a_damaged_export_is_refused_naming_the_dataset(cli, ternary, tmp_path):
    export = str(tmp_path / "model.hyb")
    subprocess.run([cli, "checkpoint", "export", ternary[1], "--out", export], check=True, capture_output=True, timeout=120)
    with h5py.File(export, "r+") as f:
        codes = f["blocks.1.wv.packed"]
        row = codes[3]
        row[0] ^= 0x01
        codes[3] = row
    with pytest.raises(RuntimeError, match="blocks.1.wv.packed fails its checksum"):
        hybrit.Generator(export)
    with h5py.File(export, "r+") as f:
        f.attrs["format"] = "something-else"
    with pytest.raises(RuntimeError, match="not a hybrit checkpoint or export"):
        hybrit.Generator(export)


def test_greedy_output_is_identical_at_batch_1_and_8(generator):
    batch = generator.generate(PROMPTS, max_tokens=40, temperature=0)
    for prompt, together in zip(PROMPTS, batch):
        alone = generator.generate(prompt, max_tokens=40, temperature=0)
        assert alone["tokens"] == together["tokens"] and alone["text"] == together["text"]


def test_the_same_seed_gives_the_same_text_whatever_the_batch(generator):
    kw = dict(max_tokens=30, temperature=0.9, top_k=50, top_p=0.95, min_p=0.02, repetition_penalty=1.1)
    a = generator.generate(PROMPTS, seed=7, **kw)
    b = generator.generate(PROMPTS[:3], seed=7, **kw)
    assert [r["tokens"] for r in a[:3]] == [r["tokens"] for r in b]
    c = generator.generate(PROMPTS, seed=8, **kw)
    assert [r["tokens"] for r in a] != [r["tokens"] for r in c]


def test_top_k_1_is_greedy_and_min_p_1_keeps_only_the_top(generator):
    greedy = generator.generate(PROMPTS[:4], max_tokens=20, temperature=0)
    for kw in ({"top_k": 1}, {"min_p": 1.0}):
        sampled = generator.generate(PROMPTS[:4], max_tokens=20, temperature=1.3, seed=5, **kw)
        assert [r["tokens"] for r in sampled] == [r["tokens"] for r in greedy]


def test_preemption_and_a_small_kv_pool_do_not_change_the_output(ternary):
    path = ternary[1]
    roomy = hybrit.Generator(path).generate(PROMPTS, max_tokens=44, temperature=0.7, seed=1)
    tight = hybrit.Generator(path, kv_blocks=8, max_running=8, prefill_chunk=7)  # 8 blocks: room for two full-context sequences
    out = tight.generate(PROMPTS, max_tokens=44, temperature=0.7, seed=1)
    assert [r["tokens"] for r in out] == [r["tokens"] for r in roomy]
    stats = tight.stats()
    assert stats["preemptions"] > 0 and stats["running"] == 0 and stats["kv_in_use"] == 0


def test_shared_prompt_prefixes_reuse_cached_blocks(ternary):
    gen = hybrit.Generator(ternary[1])
    prefix = "Once upon a time, in a land far away, "  # 39 bytes: two full blocks
    first = gen.generate(prefix + "a king", max_tokens=5, temperature=0)
    before = gen.stats()
    second = gen.generate(prefix + "a queen", max_tokens=5, temperature=0)
    after = gen.stats()
    assert after["prefix_hits"] - before["prefix_hits"] == 2
    assert after["prompt_tokens_cached"] - before["prompt_tokens_cached"] == 32
    fresh = hybrit.Generator(ternary[1]).generate(prefix + "a queen", max_tokens=5, temperature=0)
    assert second["tokens"] == fresh["tokens"] and first["finish_reason"] == "length"


def test_stop_strings_and_max_tokens(generator):
    free = generator.generate("The ", max_tokens=40, temperature=0)
    stop = free["text"][5:8]
    cut = generator.generate("The ", max_tokens=40, temperature=0, stop=[stop])
    assert cut["finish_reason"] == "stop" and cut["text"] == free["text"][: free["text"].find(stop)]
    assert len(generator.generate("The ", max_tokens=3, temperature=0)["tokens"]) == 3


def greedy_reference(generator, history, n):
    """n greedy tokens after `history`, each computed afresh (one prefill, no cache reuse) from
    the window the engine keeps: the last context - shift tokens once it would pass the context."""
    ctx = generator.info["context"]
    keep = ctx - max(1, ctx // 4)
    out, start = [], len(history) - keep if len(history) > ctx else 0
    tokens = list(history)
    for _ in range(n):
        tokens.append(int(np.argmax(generator.last_logits(tokens[start:]))))
        out.append(tokens[-1])
        if len(tokens) - start > ctx:
            start = len(tokens) - keep
    return out


def test_generation_slides_its_window_past_the_context(generator):
    """max_tokens means what it says: 3 contexts of output from a 48-token model, each token the
    greedy choice over the window the engine keeps; no context finish."""
    ctx = generator.info["context"]
    prompt = generator.encode("a b c d e f g h ")
    eos = generator.info["end_of_record"]
    out = generator.generate([prompt], max_tokens=3 * ctx, temperature=0)[0]
    if out["finish_reason"] == "eos":  # the model may end the record; compare what it wrote
        assert out["tokens"][-1] == eos
    else:
        assert out["finish_reason"] == "length" and len(out["tokens"]) == 3 * ctx
    want = greedy_reference(generator, prompt, len(out["tokens"]))
    assert out["tokens"] == want
    assert generator.stats()["window_slides"] >= (len(prompt) + len(out["tokens"]) - ctx) // max(1, ctx // 4) - 1


def test_a_prompt_longer_than_the_context_keeps_its_end(generator, capfd):
    ctx = generator.info["context"]
    long = generator.encode("y" * (ctx + 30) + "The ")
    keep = ctx - max(1, ctx // 4)
    a, = generator.generate([long], max_tokens=5, temperature=0)
    b, = generator.generate([long[-keep:]], max_tokens=5, temperature=0)
    assert a["tokens"] == b["tokens"] and len(a["tokens"]) == 5
    assert f"exceed the model's context of {ctx}; it keeps its last {keep} tokens" in capfd.readouterr().err


def test_stream_yields_the_same_text_and_cancels_when_closed(generator):
    whole = generator.generate("You will", max_tokens=30, temperature=0.8, seed=4)
    pieces = list(generator.stream("You will", max_tokens=30, temperature=0.8, seed=4))
    assert "".join(pieces) == whole["text"] and len(pieces) > 1
    it = generator.stream("You will", max_tokens=30, temperature=0.8, seed=4)
    next(it)
    it.close()
    assert generator.stats()["running"] == 0 and generator.stats()["waiting"] == 0


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"min_p": 2}, "min_p"), ({"top_k": -3}, "top_k"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"max_tokens": 0}, "max_tokens"), ({"stop": [""]}, "stop"),
])
def test_bad_sampling_values_are_refused(generator, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generator.generate("The ", **kwargs)


def test_bad_prompts_are_refused(generator):
    with pytest.raises(ValueError, match="empty"):
        generator.generate("")
    with pytest.raises(ValueError, match="last_logits: no tokens"):
        generator.last_logits([])


def test_bad_token_ids_are_refused_not_truncated_or_wrapped(generator):
    with pytest.raises(TypeError, match="token ids must be integers, got 65.7"):
        generator.generate([[65.7, 66]], max_tokens=2)
    with pytest.raises(ValueError, match=r"decode: token 300 at position 1 is outside \[0, 257\)"):
        generator.decode([72, 300])
    assert generator.decode(np.array([72, 105])) == "Hi"
    assert generator.generate([np.array([72, 105], dtype=np.int64)], max_tokens=2)[0]["finish_reason"] in ("length", "eos")


def test_two_interleaved_streams_and_threads_each_get_their_own_events(generator):
    prompts = ["The ", "A man walks", "Never", "Q: "]
    alone = [generator.generate(p, max_tokens=25, temperature=0)["text"] for p in prompts]
    # Round-robin over four live streams: before, one stream's step swallowed the others' events.
    live = {i: generator.stream(p, max_tokens=25, temperature=0) for i, p in enumerate(prompts)}
    got = {i: "" for i in live}
    while live:
        for i in list(live):
            try:
                got[i] += next(live[i])
            except StopIteration:
                del live[i]
    assert [got[i] for i in range(4)] == alone
    # Closing one stream cancels it alone: the other still gets all of its text.
    a, b = generator.stream(prompts[0], max_tokens=25, temperature=0), generator.stream(prompts[1], max_tokens=25, temperature=0)
    first = next(a)
    next(b)
    b.close()
    assert first + "".join(a) == alone[0]
    # generate() from several threads at once.
    results = [None] * 4
    def work(i):
        results[i] = generator.generate(prompts[i], max_tokens=25, temperature=0)["text"]
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone
    assert generator.stats()["running"] == 0 and generator.stats()["waiting"] == 0


def test_hybrit_generate_streams_text(cli, ternary, generator):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYBRIT_")}
    r = subprocess.run([cli, "generate", "--checkpoint", ternary[1], "--prompt", "The ", "--max-tokens", "20", "--temperature", "0"],
                       capture_output=True, text=True, env=env, check=True, timeout=120)
    expect = generator.generate("The ", max_tokens=20, temperature=0)
    assert r.stdout == "The " + expect["text"] + "\n"
    assert "tokens/s" in r.stderr and "finished: length" in r.stderr
    bad = subprocess.run([cli, "generate", "--checkpoint", ternary[1], "--prompt", "x", "--top-p", "0"], capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and "top_p" in bad.stderr


def test_the_cli_and_python_share_their_sampling_defaults(cli, ternary, generator):
    # No sampling option anywhere: the same defaults (SamplingParams') and the one seed rule (none
    # given: a fresh one, reported) must let Python make the CLI's text again.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYBRIT_")}
    runs = [subprocess.run([cli, "generate", "--checkpoint", ternary[1], "--prompt", "The ", "--max-tokens", "20"],
                           capture_output=True, text=True, env=env, check=True, timeout=120) for _ in range(2)]
    seeds = [int(re.search(r"seed (\d+)", r.stderr).group(1)) for r in runs]
    assert seeds[0] != seeds[1], "unseeded runs should draw fresh seeds"
    # The CLI prints control characters and broken UTF-8 as U+FFFD: compare what both print alike.
    plain = lambda text: "".join(ch for ch in text if ch.isprintable() and ch != "\ufffd")
    for r, seed in zip(runs, seeds):
        assert plain(r.stdout) == plain("The " + generator.generate("The ", max_tokens=20, seed=seed)["text"])
    a, b = generator.generate("The ", max_tokens=20), generator.generate("The ", max_tokens=20)
    assert a["seed"] != b["seed"] and generator.generate("The ", max_tokens=20, seed=a["seed"]) == a
    help_text = subprocess.run([cli, "generate", "--help"], capture_output=True, text=True, check=True).stdout
    assert f"--temperature FLOAT={hybrit._hybrit._sampling_defaults()['temperature']:g} " in help_text