"""k-means against scikit-learn (python3-sklearn) on the same data, k and number of inits."""
import numpy as np
import pytest

import hybrit

sklearn = pytest.importorskip("sklearn", reason="python3-sklearn is the reference (run.sh installs it)")
from sklearn.cluster import KMeans  # noqa: E402
from sklearn.datasets import make_blobs  # noqa: E402


@pytest.mark.parametrize("kind", ["blobs", "uniform"])
def test_inertia_within_half_a_percent_of_sklearn(kind):
    base = np.random.SeedSequence().entropy % 10000
    ratios = []
    for seed in range(base, base + 9):  # the median of 9: single runs differ by local optima
        if kind == "blobs":
            x, _ = make_blobs(n_samples=3000, centers=12, n_features=8, cluster_std=1.5, random_state=seed)
        else:
            x = np.random.default_rng(seed).random((3000, 8))
        x = x.astype(np.float32)
        ours = hybrit.kmeans(x, 12, seed=seed, n_init=3, max_points_per_centroid=0)
        ref = KMeans(n_clusters=12, n_init=3, random_state=seed).fit(x)
        assert ours.labels.shape == (3000,) and ours.centroids.shape == (12, 8)
        # inertia is what it says: the sum of squared distances to the assigned centroids
        recomputed = ((x.astype(np.float64) - ours.centroids[ours.labels]) ** 2).sum()
        assert ours.inertia == pytest.approx(recomputed, rel=1e-4)
        ratios.append(ours.inertia / ref.inertia_)
    assert np.median(ratios) < 1.005, ratios


def test_same_given_centroids_give_identical_labels():
    x, _ = make_blobs(n_samples=2000, centers=6, n_features=5, random_state=3)
    x = x.astype(np.float32)
    init = x[np.random.default_rng(3).choice(2000, 6, replace=False)].copy()
    ours = hybrit.kmeans(x, 6, init=init, max_points_per_centroid=0)
    ref = KMeans(n_clusters=6, init=init, n_init=1).fit(x)
    np.testing.assert_array_equal(ours.labels, ref.labels_)
    np.testing.assert_allclose(ours.centroids, ref.cluster_centers_, rtol=1e-4, atol=1e-4)
    assert ours.converged


def test_subsampling_spherical_and_every_point_labelled():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((20000, 16)).astype(np.float32)
    sub = hybrit.kmeans(x, 10, seed=1, max_points_per_centroid=50)  # trains on 500 points
    full = hybrit.kmeans(x, 10, seed=1, max_points_per_centroid=0)
    assert sub.labels.shape == (20000,) and set(np.unique(sub.labels)) == set(range(10))
    assert sub.inertia < 1.05 * full.inertia
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sph = hybrit.kmeans(x, 10, seed=1, spherical=True)
    np.testing.assert_allclose(np.linalg.norm(sph.centroids, axis=1), 1.0, rtol=1e-5)


def test_empty_clusters_are_repaired():
    # Four far-apart tight groups, initialised with three centroids in the same group: without
    # repair, clusters would stay empty.
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.standard_normal((100, 2)) * 0.1 + c for c in ([0, 0], [50, 0], [0, 50], [50, 50])]).astype(np.float32)
    init = np.array([[0, 0], [0.01, 0], [0, 0.01], [50, 50]], dtype=np.float32)
    r = hybrit.kmeans(x, 4, init=init, max_points_per_centroid=0)
    assert np.bincount(r.labels, minlength=4).min() == 100


def test_bad_input_is_one_clear_error():
    x = np.zeros((5, 3), dtype=np.float32)
    with pytest.raises(ValueError, match=r"k = 6 is more than the number of points \(5\)"):
        hybrit.kmeans(x, 6)
    with pytest.raises(ValueError, match="no points"):
        hybrit.kmeans(np.zeros((0, 3), dtype=np.float32), 1)
    with pytest.raises(ValueError, match="0 dimensions"):
        hybrit.kmeans(np.zeros((5, 0), dtype=np.float32), 2)
    bad = np.ones((5, 3), dtype=np.float32)
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="point 3 contains NaN or Inf"):
        hybrit.kmeans(bad, 2)
    with pytest.raises(ValueError, match=r"given centroids must be f32 \(2, 3\)"):
        hybrit.kmeans(x, 2, init=np.zeros((3, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="init: expected 'k-means\\+\\+', 'random'"):
        hybrit.kmeans(x, 2, init="kmeans++")


@pytest.mark.parametrize("cap", [2**62, 2**63 - 1])
def test_a_huge_sample_cap_trains_on_every_point(cap):
    # k * max_points_per_centroid overflowed int64 and sampled from garbage (SIGSEGV); a cap
    # beyond the data means no sampling, the same as 0.
    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 4)).astype(np.float32)
    big = hybrit.kmeans(x, 4, seed=2, max_points_per_centroid=cap)
    full = hybrit.kmeans(x, 4, seed=2, max_points_per_centroid=0)
    np.testing.assert_array_equal(big.labels, full.labels)
    assert big.inertia == full.inertia
