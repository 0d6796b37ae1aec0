// k-means, faiss-style: a parameter struct with documented defaults and the algorithm in one
// function. Lloyd iterations run through the dispatcher's kmeans_assign and kmeans_update, so the
// backend follows the data's size.
#pragma once
#include <cstdint>

#include "core/comm.hpp"
#include "dispatch/dispatcher.hpp"

namespace hybrit {

struct KMeansOptions {
  int64_t k = 8;
  int max_iter = 300;  // Lloyd iterations per initialisation (scikit-learn's default)
  // Converged when the squared centroid shift of an iteration, summed over centroids, is at most
  // tol times the mean per-feature variance of the data (scikit-learn's rule).
  double tol = 1e-4;
  int n_init = 1;  // initialisations; the one with the lowest inertia wins
  enum class Init { kmeanspp, random, given };
  Init init = Init::kmeanspp;  // k-means++ is greedy: 2 + floor(ln k) candidates per new centroid
  Tensor initial_centroids;    // (k, d) for Init::given
  uint64_t seed = 0;
  // Train on a random sample of at most k * this many points (faiss's default 256; 0: all). The
  // final labels and inertia always cover every point.
  int64_t max_points_per_centroid = 256;
  bool spherical = false;  // centroids normalised to unit length after each update (cosine k-means)
};

struct KMeansResult {
  Tensor centroids;  // (k, d) f32
  Tensor labels;     // (n,) i32, for every point (over ranks: this rank's points)
  double inertia = 0;  // sum of squared distances of every point to its centroid
  int iterations = 0;  // of the winning initialisation
  bool converged = false;
};

// Errors (one line each): k > n, d = 0, empty input, NaN or Inf in the data (naming the point),
// given centroids of the wrong shape.
//
// Over the ranks of a job (`comm` with several processes; mpirun hybrit reduce): `points` are this
// rank's rows of the whole, the ranks holding consecutive pieces in rank order (any sizes, empty
// ones too). The training sample, the k-means++ draws and the empty-cluster repair are those one
// process makes over the whole; each Lloyd iteration assigns the local points and all-reduces the
// per-cluster sums and counts. Centroids, iterations and inertia come out the same on every rank
// and, within float rounding of the sums' order, as one process computes them; labels are the
// local rows'.
KMeansResult kmeans(Dispatcher& dispatcher, const Tensor& points, const KMeansOptions& options, Comm* comm = nullptr);

}  // namespace hybrit
