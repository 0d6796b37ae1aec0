"""matmul_ternary on every backend against the float reference, at awkward sizes, with extreme
values, and past the int32 range of a naive accumulator."""
import numpy as np
import pytest

import hybrit


def reference(xq, x_scales, q, w_scale):
    return (xq.astype(np.int64) @ q.astype(np.int64).T).astype(np.float64) * (np.float64(w_scale) / x_scales[:, None].astype(np.float64))


@pytest.mark.parametrize("m, n, k", [(1, 1, 1), (1, 7, 3), (3, 5, 255), (4, 9, 256), (5, 17, 257), (8, 33, 1000), (13, 64, 2048), (16, 3, 4099)])
def test_matches_the_integer_reference(dispatcher, rng, m, n, k):
    xq = rng.integers(-128, 128, (m, k), dtype=np.int8)
    q = rng.integers(-1, 2, (n, k), dtype=np.int8)
    x_scales = rng.uniform(0.5, 200, m).astype(np.float32)
    w_scale = float(rng.uniform(0.01, 2))
    packed = dispatcher.pack_ternary(q)
    y = dispatcher.matmul_ternary(xq, x_scales, packed, w_scale)
    assert y.shape == (m, n) and y.dtype == np.float32
    np.testing.assert_array_equal(y, reference(xq, x_scales, q, np.float32(w_scale)).astype(np.float32))  # the same f64 rounding: exact


def test_every_backend_and_isa_gives_the_same_bits(rng):
    m, n, k = 6, 40, 3001
    xq = rng.integers(-128, 128, (m, k), dtype=np.int8)
    q = rng.integers(-1, 2, (n, k), dtype=np.int8)
    x_scales = rng.uniform(0.5, 200, m).astype(np.float32)
    results = {}
    best = hybrit.info()["simd"]  # the best level the kernels use here
    levels = ["scalar", "avx2", "avx512"][: ["scalar", "avx2", "avx512"].index(best) + 1]
    for backend in ["c", "tbb"]:
        for simd in levels:  # every level this CPU has: an error here is a failure, not a skip
            d = hybrit.Dispatcher(backend=backend, simd=simd, use_environment=False)
            results[(backend, simd)] = d.matmul_ternary(xq, x_scales, d.pack_ternary(q), 0.37)
    assert len(results) == 2 * len(levels)
    first = next(iter(results.values()))
    for key, y in results.items():
        np.testing.assert_array_equal(y, first, err_msg=str(key))


def test_long_rows_do_not_overflow_the_accumulators(dispatcher):
    k = 9_000_000  # 2 * 128 * k exceeds 2^31: the SIMD kernels' int32 lanes must be flushed
    xq = np.full((1, k), -128, dtype=np.int8)
    # Five weight rows: a tile of four (the kernels that take four rows at once) and one more.
    q = np.ones((5, k), dtype=np.int8)
    q[1::2, ::2] = -1
    packed = dispatcher.pack_ternary(q)
    y = dispatcher.matmul_ternary(xq, np.array([2.0], np.float32), packed, 1.0)
    assert list(y[0]) == [np.float32(-128 * k / 2.0), 0.0, np.float32(-128 * k / 2.0), 0.0, np.float32(-128 * k / 2.0)]


def test_bad_shapes_are_refused(rng):
    d = hybrit.Dispatcher(use_environment=False)
    xq = np.zeros((2, 10), np.int8)
    with pytest.raises(ValueError, match="packed weights must be ternary2 \\(n, 3\\) for k = 10"):
        d.matmul_ternary(xq, np.ones(2, np.float32), np.zeros((4, 2), np.uint8), 1.0)
    with pytest.raises(ValueError, match="activation scales must be f32 with 2 elements"):
        d.matmul_ternary(xq, np.ones(3, np.float32), np.zeros((4, 3), np.uint8), 1.0)
    with pytest.raises(ValueError, match="weight scale must be positive"):
        d.matmul_ternary(xq, np.ones(2, np.float32), np.zeros((4, 3), np.uint8), 0.0)
