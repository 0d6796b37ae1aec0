#!/usr/bin/python3
"""k-means speed: hybrit against faiss (python3-faiss) and scikit-learn (python3-sklearn) in one
run, on the same data, from the same initial centroids, for the same number of Lloyd iterations
on the full data (no sub-sampling), with the same threads; full-data inertia reported beside each
time. Writes results/kmeans_vs_faiss_sklearn.md (issue 5's first experiment)."""
import time

import faiss
import numpy as np
from sklearn.cluster import KMeans

from common import hybrit, machine_header

ITERATIONS = 20
THREADS = hybrit.info()["granted_cpus"]


def inertia(x, centroids):
    _, labels = faiss.knn(x, centroids, 1) if hasattr(faiss, "knn") else (None, None)
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(centroids)
    d, _ = index.search(x, 1)
    return float(d.astype(np.float64).sum())


def case(n, d, k, seed=0):
    rng = np.random.default_rng(seed)
    # A mixture of Gaussians, so the clustering is meaningful and all three find similar optima.
    centers = rng.standard_normal((k, d)).astype(np.float32) * 4
    x = (centers[rng.integers(0, k, n)] + rng.standard_normal((n, d)).astype(np.float32)).astype(np.float32)
    init = x[rng.choice(n, k, replace=False)].copy()
    rows = []

    t = time.perf_counter()
    r = hybrit.kmeans(x, k, init=init, max_iter=ITERATIONS, tol=0.0, max_points_per_centroid=0)
    rows.append(("hybrit (auto backend)", time.perf_counter() - t, inertia(x, r.centroids), r.n_iter))

    faiss.omp_set_num_threads(THREADS)
    km = faiss.Kmeans(d, k, niter=ITERATIONS, seed=seed, max_points_per_centroid=n, min_points_per_centroid=1, verbose=False)
    t = time.perf_counter()
    km.train(x, init_centroids=init)
    rows.append((f"faiss {faiss.__version__}", time.perf_counter() - t, inertia(x, km.centroids), ITERATIONS))

    t = time.perf_counter()
    sk = KMeans(n_clusters=k, init=init, n_init=1, max_iter=ITERATIONS, tol=0.0, algorithm="lloyd").fit(x)
    rows.append(("scikit-learn (lloyd)", time.perf_counter() - t, inertia(x, sk.cluster_centers_.astype(np.float32)), sk.n_iter_))
    return rows


def main():
    import sklearn
    print(machine_header("k-means: hybrit vs faiss vs scikit-learn", "/usr/bin/python3 experiments/bench_kmeans.py"))
    print(f"Same data (a mixture of k Gaussians), same initial centroids, {ITERATIONS} Lloyd iterations on all points, "
          f"{THREADS} threads each; scikit-learn {sklearn.__version__}. Inertia: full-data sum of squared distances.\n")
    for n, d, k in [(20000, 64, 64), (1_000_000, 64, 256)]:
        rows = case(n, d, k)
        base = {name: s for name, s, _, _ in rows}
        ours = rows[0][1]
        print(f"### n = {n:,}, d = {d}, k = {k}\n")
        print("| implementation | time | per iteration | inertia | iterations | hybrit's speed-up |")
        print("|---|---|---|---|---|---|")
        for name, s, inert, iters in rows:
            print(f"| {name} | {s:.2f} s | {s / max(iters, 1) * 1e3:.1f} ms | {inert:.6g} | {iters} | {s / ours:.2f}x |")
        print()
    print("Goals (issue 5): faster than faiss CPU at equal inertia, at least 5x scikit-learn.")


if __name__ == "__main__":
    main()
