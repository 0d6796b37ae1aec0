"""A hybrit model in llama.cpp: export it as GGUF and compare what llama.cpp does with it.

Needs a llama.cpp built beside hybrit (its CPU tools: llama-cli, llama-perplexity, llama-tokenize,
and libllama), given by path; nothing of llama.cpp is part of hybrit. For the checkpoint:
  1. `hybrit checkpoint export --format gguf` (TQ2_0, and TQ1_0 for the file sizes);
  2. tokenization: llama-tokenize on the held-out text gives the byte ids hybrit uses;
  3. greedy continuations of 10 prompts: `hybrit generate --temperature 0` against
     `llama-cli --temp 0` on the exported file, and the agreeing prefix length;
  4. the first step's logits: hybrit's inference model (Generator.last_logits) against llama.cpp's
     (a 40-line program against libllama, compiled into a temporary folder), mean |difference|;
  5. perplexity on the same held-out text by the same rule (llama-perplexity's: chunks of the
     context, the second half of each chunk scored): llama-perplexity, and hybrit's training
     forward (Model.from_checkpoint) and inference engine (Generator.last_logits).

  /usr/bin/python3 experiments/gguf_check.py --llama /path/to/llama.cpp -m RUN_DIR|CKPT.h5 [--text FILE]

Writes experiments/results/gguf.md.
"""
import argparse
import math
import os
import re
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CLI, ROOT, hybrit, machine_header  # noqa: E402

PROMPTS = ["The meaning of life", "A computer is", "Q: Why did the chicken", "Never trust", "In the beginning",
           "You will", "There are two kinds of", "Love is", "The best way to", "If at first"]

LOGITS_C = r"""
#include <cstdio>
#include <cstring>
#include <vector>
#include "llama.h"
// Prints the next-token logits after a prompt (argv[2]) under the model argv[1], one per line.
int main(int argc, char** argv) {
  llama_backend_init();
  llama_model* model = llama_model_load_from_file(argv[1], llama_model_default_params());
  if (!model) return 1;
  llama_context_params cp = llama_context_default_params();
  cp.n_ctx = 512; cp.n_threads = 2; cp.n_threads_batch = 2;
  llama_context* ctx = llama_init_from_model(model, cp);
  const llama_vocab* vocab = llama_model_get_vocab(model);
  std::vector<llama_token> tokens(4096);
  const int n = llama_tokenize(vocab, argv[2], (int)strlen(argv[2]), tokens.data(), (int)tokens.size(), false, false);
  if (n <= 0 || llama_decode(ctx, llama_batch_get_one(tokens.data(), n)) != 0) return 2;
  const float* logits = llama_get_logits_ith(ctx, -1);
  for (int i = 0; i < llama_vocab_n_tokens(vocab); ++i) printf("%.9g\n", logits[i]);
  return 0;
}
"""


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{r.stderr[-3000:]}")
    return r


def llama_bin(llama, name):
    path = os.path.join(llama, "build", "bin", name)
    if not os.path.exists(path):
        raise SystemExit(f"{path} is missing: build llama.cpp's CPU tools there (cmake -B build && cmake --build build)")
    return path


def hybrit_generate(model, prompt, n):
    out = run([CLI, "generate", "-m", model, "-p", prompt, "-n", str(n), "--temperature", "0"]).stdout
    return out[:-1] if out.endswith("\n") else out  # the CLI ends its output with a newline


def llama_generate(llama, gguf, prompt, n):
    out = run([llama_bin(llama, "llama-cli"), "-m", gguf, "-p", prompt, "-n", str(n), "--temp", "0", "-no-cnv", "-t", "2",
               "--no-warmup"]).stdout  # the text on stdout, the logs on stderr
    out = out[:-len(" [end of text]\n")] if out.endswith(" [end of text]\n") else out
    return out[:-2] if out.endswith("\n\n") else out  # llama-cli ends its output with two newlines


def common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def llama_perplexity(llama, gguf, text, ctx, chunks):
    r = run([llama_bin(llama, "llama-perplexity"), "-m", gguf, "-f", text, "-c", str(ctx), "-b", str(ctx), "-t", "2", "--chunks", str(chunks)])
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", r.stdout + r.stderr)
    chunks = re.search(r"calculating perplexity over (\d+) chunks", r.stdout + r.stderr)
    return float(m.group(1)), int(chunks.group(1))


def chunk_nll(tokens, ctx, n_chunks, logits_of):
    """llama-perplexity's rule: chunk i is tokens[i ctx, (i + 1) ctx); the tokens after its first half are scored."""
    nll, count = 0.0, 0
    for c in range(n_chunks):
        chunk = tokens[c * ctx:(c + 1) * ctx]
        logits = logits_of(chunk)  # (ctx, vocab): row t predicts token t + 1
        for t in range(ctx // 2, ctx - 1):
            row = logits[t].astype(np.float64)
            lse = row.max() + math.log(np.exp(row - row.max()).sum())
            nll += lse - row[chunk[t + 1]]
            count += 1
    return math.exp(nll / count), count


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama", required=True, help="a llama.cpp source tree with its CPU tools built in build/bin")
    ap.add_argument("-m", "--model", required=True, help="a hybrit run folder or training checkpoint")
    ap.add_argument("--text", default="/usr/share/common-licenses/GPL-3", help="held-out text for perplexity")
    ap.add_argument("--tokens", type=int, default=64, help="greedy tokens per prompt")
    ap.add_argument("--chunks", type=int, default=40, help="perplexity chunks (of the model's context) scored by every engine")
    ap.add_argument("--also-tokenize", nargs="*", default=[], help="more run folders whose tokenizers are compared (e.g. a BPE model)")
    ap.add_argument("--llama-rev", default="", help="the llama.cpp revision, for the report (default: git log of --llama)")
    ap.add_argument("--out", default=os.path.join(ROOT, "experiments", "results", "gguf.md"))
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="hybrit-gguf-")
    gguf = os.path.join(work, "model.gguf")
    export = run([CLI, "checkpoint", "export", a.model, "-o", gguf]).stdout.strip()
    tq1 = os.path.join(work, "model-tq1.gguf")
    run([CLI, "checkpoint", "export", a.model, "-o", tq1, "--type", "tq1_0"])
    ckpt = hybrit.Model.from_checkpoint(a.model).config
    lines = [machine_header("A hybrit model in llama.cpp (GGUF export)",
                            f"/usr/bin/python3 experiments/gguf_check.py --llama LLAMA_DIR -m {a.model}"), ""]
    version = a.llama_rev or (run(["git", "-C", a.llama, "log", "-1", "--format=%h %s"]).stdout.strip() if os.path.isdir(os.path.join(a.llama, ".git")) else "(revision not given)")
    lines += [f"- llama.cpp: {version}, CPU build (GGML_NATIVE), 2 threads", f"- model: {a.model}: {ckpt}",
              f"- export: `{export}`; TQ1_0: {os.path.getsize(tq1):,} bytes, TQ2_0: {os.path.getsize(gguf):,} bytes", ""]

    # Tokenization: llama.cpp's ids against hybrit's for this model and any --also-tokenize model.
    texts = {"held-out text": open(a.text, encoding="utf-8", errors="replace").read()[:20000],
             "unicode, spaces, digits": "Zürich café naïve — “quotes” 日本語\n  two  spaces\tand tabs, digits 1234567890 and 3.14159\n\n",
             "fortunes": open("/usr/share/games/fortunes/computers", encoding="latin-1").read()[:20000]}
    lines += ["### Tokenization (llama-tokenize --no-parse-special against hybrit's encoder)", "", "| model | tokenizer | text | tokens | equal |", "|---|---|---|---|---|"]
    for label, model in [(a.model, gguf)] + [(m, None) for m in a.also_tokenize]:
        path = model or os.path.join(work, f"tok-{len(lines)}.gguf")
        if model is None:
            run([CLI, "checkpoint", "export", label, "-o", path])
        g = hybrit.Generator(path)
        kind = "byte" if g.info["vocab_size"] == 257 else f"bpe, {g.info['vocab_size']} pieces"
        for name, t in texts.items():
            src = os.path.join(work, "text.txt")
            open(src, "w", encoding="utf-8").write(t)
            out = run([llama_bin(a.llama, "llama-tokenize"), "-m", path, "-f", src, "--ids", "--log-disable", "--no-parse-special"]).stdout.strip().splitlines()[-1]
            llama_ids = [int(x) for x in out.strip("[]").split(",") if x.strip()]
            mine = g.encode(t)
            lines.append(f"| {label} | {kind} | {name} | {len(mine):,} | {'yes' if llama_ids == mine else 'NO'} |")
    lines.append("")

    # Greedy continuations.
    lines += [f"### Greedy continuations ({a.tokens} tokens, temperature 0)", "", "| prompt | agreeing prefix (bytes of the continuation) | hybrit | llama.cpp |", "|---|---|---|---|"]
    agree = []
    for p in PROMPTS:
        h = hybrit_generate(gguf, p, a.tokens)
        l_ = llama_generate(a.llama, gguf, p, a.tokens)
        h_cont, l_cont = h[len(p):] if h.startswith(p) else h, l_[len(p):] if l_.startswith(p) else l_
        n = common_prefix(h_cont.encode(), l_cont.encode())
        agree.append((n, min(len(h_cont.encode()), len(l_cont.encode()))))
        show = lambda s: s.replace("\n", "\\n").replace("|", "\\|")[:60]  # noqa: E731
        lines.append(f"| {p} | {n} of {agree[-1][1]} | {show(h_cont)} | {show(l_cont)} |")
    lines += ["", f"In all: {sum(n for n, _ in agree)} of {sum(m for _, m in agree)} continuation bytes agree before the first difference "
              f"({sum(1 for n, m in agree if n == m)} of {len(PROMPTS)} continuations identical).", ""]

    # First-step logits.
    exe = os.path.join(work, "llama_logits")
    src = os.path.join(work, "llama_logits.cpp")
    open(src, "w").write(LOGITS_C)
    lib = os.path.join(a.llama, "build", "bin")
    run(["c++", "-O2", "-std=c++17", src, "-o", exe, f"-I{a.llama}/include", f"-I{a.llama}/ggml/include", f"-L{lib}", "-lllama", "-lggml", "-lggml-base",
         f"-Wl,-rpath,{lib}"])
    gen = hybrit.Generator(gguf)
    diffs, maxes = [], []
    for p in PROMPTS:
        ll = np.array([float(x) for x in run([exe, gguf, p]).stdout.split()], dtype=np.float64)
        hl = np.array(gen.last_logits(list(p.encode())), dtype=np.float64)
        diffs.append(np.abs(ll - hl).mean())
        maxes.append(np.abs(ll - hl).max())
    lines += ["### First-step logits", "",
              f"Over the 10 prompts, mean |hybrit - llama.cpp| of the next-token logits: {np.mean(diffs):.4f} (per prompt {min(diffs):.4f}-{max(diffs):.4f}; "
              f"largest single difference {max(maxes):.3f}). hybrit quantizes each token's activations to int8 with one scale per row; "
              "llama.cpp's TQ2_0 product quantizes them per 256-value block (q8_K), so the logits differ by that rounding.", ""]

    # Perplexity by llama-perplexity's rule.
    model_cfg = hybrit.Model.from_checkpoint(a.model).config
    ctx = model_cfg["context"]
    ppl_llama, n_chunks = llama_perplexity(a.llama, gguf, a.text, ctx, a.chunks)
    tokens = gen.encode(open(a.text, encoding="utf-8", errors="replace").read())
    model = hybrit.Model.from_checkpoint(a.model)

    def training_logits(chunk):
        arr = np.array([chunk], dtype=np.int32)
        model.forward(arr, arr)
        return model.logits()

    def inference_logits(chunk):  # one prefill per scored position (the engine returns the last row only)
        rows = [np.zeros(1)] * (len(chunk) // 2)
        return rows + [np.array(gen.last_logits(chunk[:t + 1])) for t in range(len(chunk) // 2, len(chunk))]

    ppl_train, scored = chunk_nll(tokens, ctx, n_chunks, training_logits)
    ppl_infer, _ = chunk_nll(tokens, ctx, n_chunks, inference_logits)
    lines += [f"### Perplexity on {a.text}: {n_chunks} chunks of {ctx} tokens, {scored:,} tokens scored (the second half of each chunk, llama-perplexity's rule)", "",
              "| engine | perplexity | vs llama.cpp |", "|---|---|---|",
              f"| llama.cpp (llama-perplexity, TQ2_0) | {ppl_llama:.4f} | 1.0000 |",
              f"| hybrit inference engine (packed 2-bit weights, int8 activations per token) | {ppl_infer:.4f} | {ppl_infer / ppl_llama:.4f} |",
              f"| hybrit training forward (Model.from_checkpoint, the numbers `hybrit eval` uses) | {ppl_train:.4f} | {ppl_train / ppl_llama:.4f} |", ""]
    with open(a.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
