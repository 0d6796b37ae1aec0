"""hybrit: train and serve 1.58-bit (ternary, BitNet b1.58-style) transformer language models.

The native core lives in ``hybrit._hybrit``; this package re-exports it:

    >>> import numpy as np, hybrit
    >>> d = hybrit.Dispatcher()                 # backend per call, by size and hardware
    >>> q, s = d.quantize_ternary(np.random.randn(4096).astype(np.float32))
    >>> d.metrics()                             # calls, elements, bytes, seconds per op/backend

Arrays must be C-contiguous with the documented dtype (float32 for values); those are used
without copying. Anything else raises TypeError (wrong type or dtype) or ValueError (layout,
shape). Errors from the library map to ValueError (bad input), OSError (files), RuntimeError
(corrupt data, unsupported) and MemoryError.
"""
import collections
import operator
import threading

from ._hybrit import _Generator, _engine_defaults, _fresh_seed, _op_dims, _sampling_defaults, Dispatcher, KMeansResult, Model, Trainer, __version__, default_profile_path, dispatch_report, embed_text, export_checkpoint, embed_with_checkpoint, evaluate, info, kmeans, read_corpus, reduce, select, train

__all__ = ["Generator", "Dispatcher", "Model", "Trainer", "train", "evaluate", "load_checkpoint", "kmeans", "KMeansResult", "embed_text", "embed_with_checkpoint", "select", "reduce", "read_corpus", "dispatch_report", "export_checkpoint", "info",
           "default_profile_path", "op_size"]


def load_checkpoint(path):
    """A checkpoint's contents, checksums verified: {"step", "tokens_seen", "seed", "config" (a
    dict), "config_yaml", "tokenizer" (a dict), "params": {name: array}, "optimizer": {name: array}}."""
    import json

    import yaml  # PyYAML, a dependency of Debian's python3-torch

    from ._hybrit import _load_checkpoint

    out = _load_checkpoint(str(path))
    out["config"] = yaml.safe_load(out["config_yaml"])
    out["tokenizer"] = json.loads(out["tokenizer"])
    return out


def op_size(op, *dims):
    """The dims Dispatcher.choose takes for an op, checked against the op table (returns them as a
    list): quantize_ternary (n); quantize_int8_rows, pack_ternary, unpack_ternary (rows, cols);
    matmul and matmul_ternary (m, n, k); kmeans_assign and kmeans_update (n, k, d);
    attention_forward and attention_backward (batch * heads, seq, head_dim).
    """
    table = _op_dims()
    if op not in table:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join(table)}")
    count, names = table[op]
    if len(dims) != count:
        raise ValueError(f"{op} takes {count} dims ({names}), got {len(dims)}")
    return list(dims)


_SAMPLING = _sampling_defaults()  # SamplingParams' defaults: the same in the CLI, the server and here
_ENGINE = _engine_defaults()


def _token_id(t):
    """A token id as an int: ints and numpy integers pass, 65.7 or "65" is a TypeError (not truncated)."""
    try:
        return operator.index(t)
    except TypeError:
        raise TypeError(f"token ids must be integers, got {t!r}") from None


class Generator:
    """Text generation from a training checkpoint or its export (`hybrit checkpoint export`):
    packed ternary weights, a paged KV cache and continuous batching (inference/engine.hpp).

    g = hybrit.Generator("runs/tiny/ckpt-00002000.h5")
    g.generate(["Q: ", "A fool"], max_tokens=100, temperature=0.8, seed=1)   # batched, a list of dicts
    for piece in g.stream("Life is", max_tokens=50): print(piece, end="")

    Sampling, in this order: repetition_penalty, temperature (0: greedy), top_k, top_p, min_p, one
    draw keyed by (seed, output position). Outputs end at the end-of-record token ("eos"),
    max_tokens ("length") or a stop string ("stop"); past the model's context the window slides
    (the last context - context/4 tokens are kept and recomputed), and a prompt longer than the
    context keeps its end. No seed: a fresh one, as in the CLI and the server.
    """

    def __init__(self, checkpoint, packed=True, kv_blocks=_ENGINE["kv_blocks"], max_running=_ENGINE["max_running"],
                 prefill_chunk=_ENGINE["prefill_chunk"], backend=None):
        self._g = _Generator(str(checkpoint), packed, kv_blocks, max_running, prefill_chunk, backend)
        self.info = self._g.info()
        # One engine serves every caller: each request's events wait in its own queue, so two
        # generate() or stream() calls (interleaved iterators, or threads) never see each other's.
        self._lock = threading.RLock()
        self._queues = {}

    def _submit(self, prompt, max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop):
        tokens = self._g.encode(prompt) if isinstance(prompt, str) else [_token_id(t) for t in prompt]
        seed = _fresh_seed() if seed is None else seed
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        with self._lock:
            request = self._g.submit(tokens, max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop)
            self._queues[request] = collections.deque()
        return request

    def _next_events(self, request):
        """The events of `request` that have arrived, stepping the engine (for everyone) until one has."""
        with self._lock:
            queue = self._queues[request]
            while not queue:
                for event in self._g.step():
                    if event[0] in self._queues:
                        self._queues[event[0]].append(event)
            events = list(queue)
            queue.clear()
            if events[-1][3] is not None:  # finished: its queue goes
                del self._queues[request]
            return events

    def _cancel(self, request):
        with self._lock:
            if request in self._queues:
                self._g.cancel(request)
                while request in self._queues:  # until its final (cancelled) event, others' events kept
                    self._next_events(request)

    def generate(self, prompts, max_tokens=128, temperature=_SAMPLING["temperature"], top_k=_SAMPLING["top_k"], top_p=_SAMPLING["top_p"],
                 min_p=_SAMPLING["min_p"], repetition_penalty=_SAMPLING["repetition_penalty"], seed=None, stop=None):
        """All prompts batched together; returns one dict per prompt (text, tokens, finish_reason,
        seed), or one dict for a single string prompt. seed None: a fresh one (returned), as the
        CLI and the server do; every prompt of one call shares it."""
        single = isinstance(prompts, str)
        seed = _fresh_seed() if seed is None else seed
        ids = []
        try:
            for p in ([prompts] if single else prompts):
                ids.append(self._submit(p, max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop))
            out = {i: {"text": b"", "tokens": [], "finish_reason": None, "seed": seed} for i in ids}
            for i in ids:
                while out[i]["finish_reason"] is None:
                    for _, token, text, finished in self._next_events(i):
                        out[i]["text"] += text
                        if token >= 0:
                            out[i]["tokens"].append(token)
                        if finished:
                            out[i]["finish_reason"] = finished
        except BaseException:
            for i in ids:
                self._cancel(i)
            raise
        results = [dict(out[i], text=out[i]["text"].decode("utf-8", errors="replace")) for i in ids]
        return results[0] if single else results

    def stream(self, prompt, max_tokens=128, temperature=_SAMPLING["temperature"], top_k=_SAMPLING["top_k"], top_p=_SAMPLING["top_p"],
               min_p=_SAMPLING["min_p"], repetition_penalty=_SAMPLING["repetition_penalty"], seed=None, stop=None):
        """Yields the text as it is made (whole UTF-8 characters); closing the iterator cancels the
        request. seed None: a fresh one."""
        request = self._submit(prompt, max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop)
        self.last_finish_reason = None
        finished = None
        try:
            while finished is None:
                for _, token, text, finished in self._next_events(request):
                    if text:
                        yield text.decode("utf-8", errors="replace")
            self.last_finish_reason = finished
        finally:
            if finished is None:
                self._cancel(request)

    def decode(self, tokens):
        """Token ids back to text (invalid UTF-8 replaced); ids outside the vocabulary are an error."""
        return self._g.decode([_token_id(t) for t in tokens]).decode("utf-8", errors="replace")

    def last_logits(self, tokens):
        """The next-token logits after `tokens` (a list of ids), computed as the engine does."""
        return self._g.last_logits([int(t) for t in tokens])

    def stats(self):
        """Engine and KV cache counters: running, waiting, tokens, preemptions, blocks in use, prefix hits."""
        return self._g.stats()

    def encode(self, text):
        return self._g.encode(text)
