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
from ._hybrit import Dispatcher, KMeansResult, Model, Trainer, __version__, default_profile_path, dispatch_report, embed_text, embed_with_checkpoint, info, kmeans, read_corpus, reduce, select, train

__all__ = ["Dispatcher", "Model", "Trainer", "train", "load_checkpoint", "kmeans", "KMeansResult", "embed_text", "embed_with_checkpoint", "select", "reduce", "read_corpus", "dispatch_report", "info",
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
    """The dims Dispatcher.choose takes for each op, spelled out (returns them as a list):

    quantize_ternary: (n,); quantize_int8_rows, pack_ternary, unpack_ternary: (rows, cols);
    matmul: (m, n, k); kmeans_assign and kmeans_update: (n, k, d).
    """
    expected = {"quantize_ternary": 1, "quantize_int8_rows": 2, "pack_ternary": 2, "unpack_ternary": 2,
                "matmul": 3, "kmeans_assign": 3, "kmeans_update": 3}
    if op not in expected:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join(expected)}")
    if len(dims) != expected[op]:
        raise ValueError(f"{op} takes {expected[op]} dims, got {len(dims)}")
    return list(dims)
