#include "clustering/kmeans.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "core/rng.hpp"

namespace hybrit {

namespace {

constexpr uint64_t kStream = 0x4b4d45414e53ull;  // "KMEANS"

Tensor gather_rows(const Tensor& x, const std::vector<int64_t>& rows) {
  const int64_t d = x.dim(1);
  Tensor out = Tensor::empty({int64_t(rows.size()), d}, DType::f32);
  for (size_t i = 0; i < rows.size(); ++i) std::memcpy(out.data<float>() + int64_t(i) * d, x.data<float>() + rows[i] * d, size_t(d) * sizeof(float));
  return out;
}

// `count` distinct indices of [0, n), by a partial Fisher-Yates shuffle.
std::vector<int64_t> sample_indices(int64_t n, int64_t count, Rng& rng) {
  std::vector<int64_t> idx(static_cast<size_t>(n));
  std::iota(idx.begin(), idx.end(), 0);
  for (int64_t i = 0; i < count; ++i) std::swap(idx[size_t(i)], idx[size_t(i + int64_t(rng.below(uint64_t(n - i))))]);
  idx.resize(size_t(count));
  return idx;
}

std::vector<double> row_norms(const Tensor& x) {
  const int64_t n = x.dim(0), d = x.dim(1);
  std::vector<double> out(static_cast<size_t>(n));
  const float* xp = x.data<float>();  // checked once: data<T>() checks the dtype on every call
  for (int64_t i = 0; i < n; ++i) {
    double s = 0;
    for (int64_t j = 0; j < d; ++j) s += double(xp[i * d + j]) * xp[i * d + j];
    out[size_t(i)] = s;
  }
  return out;
}

// Squared distances of every point to each candidate (points x candidates), in the GEMM form
// through the dispatcher.
std::vector<double> distances_to(Dispatcher& disp, const Tensor& x, const std::vector<double>& xn, const Tensor& cand) {
  const int64_t n = x.dim(0), c = cand.dim(0);
  Tensor dots = Tensor::empty({n, c}, DType::f32);
  disp.matmul(x, cand, dots, {false, true, 1.0f, 0.0f});
  const std::vector<double> cn = row_norms(cand);
  std::vector<double> out(static_cast<size_t>(n * c));
  const float* dp = dots.data<float>();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < c; ++j) out[size_t(i * c + j)] = std::max(0.0, xn[size_t(i)] + cn[size_t(j)] - 2.0 * dp[i * c + j]);
  return out;
}

// Greedy k-means++ (Arthur and Vassilvitskii; the greedy variant of scikit-learn): each new
// centroid is the best of 2 + floor(ln k) candidates drawn in proportion to D^2.
Tensor kmeanspp(Dispatcher& disp, const Tensor& x, int64_t k, Rng& rng) {
  const int64_t n = x.dim(0);
  const int trials = 2 + int(std::log(double(k)));
  const std::vector<double> xn = row_norms(x);
  std::vector<int64_t> chosen = {int64_t(rng.below(uint64_t(n)))};
  std::vector<double> closest = distances_to(disp, x, xn, gather_rows(x, chosen));
  double potential = std::accumulate(closest.begin(), closest.end(), 0.0);
  std::vector<double> cumulative(static_cast<size_t>(n));
  for (int64_t c = 1; c < k; ++c) {
    std::partial_sum(closest.begin(), closest.end(), cumulative.begin());
    std::vector<int64_t> cand(static_cast<size_t>(trials));
    for (auto& id : cand) {
      const double r = double(rng.uniform()) * potential;
      id = std::min<int64_t>(n - 1, std::upper_bound(cumulative.begin(), cumulative.end(), r) - cumulative.begin());
    }
    const std::vector<double> dist = distances_to(disp, x, xn, gather_rows(x, cand));
    int best = 0;
    double best_pot = INFINITY;
    for (int t = 0; t < trials; ++t) {
      double pot = 0;
      for (int64_t i = 0; i < n; ++i) pot += std::min(closest[size_t(i)], dist[size_t(i * trials + t)]);
      if (pot < best_pot) best_pot = pot, best = t;
    }
    for (int64_t i = 0; i < n; ++i) closest[size_t(i)] = std::min(closest[size_t(i)], dist[size_t(i * trials + best)]);
    potential = best_pot;
    chosen.push_back(cand[size_t(best)]);
  }
  return gather_rows(x, chosen);
}

void normalise_rows(Tensor& c) {
  const int64_t k = c.dim(0), d = c.dim(1);
  float* cp = c.data<float>();
  for (int64_t j = 0; j < k; ++j) {
    double s = 0;
    for (int64_t t = 0; t < d; ++t) s += double(cp[j * d + t]) * cp[j * d + t];
    const float inv = s > 0 ? float(1.0 / std::sqrt(s)) : 0.0f;
    for (int64_t t = 0; t < d; ++t) cp[j * d + t] *= inv;
  }
}

}  // namespace

KMeansResult kmeans(Dispatcher& disp, const Tensor& x, const KMeansOptions& o) {
  if (x.dtype() != DType::f32 || x.ndim() != 2) fail(ErrorKind::invalid_argument, "kmeans: points must be a 2-D f32 matrix, got ", dtype_name(x.dtype()), " ", shape_str(x.shape()));
  const int64_t n = x.dim(0), d = x.dim(1), k = o.k;
  if (n == 0) fail(ErrorKind::invalid_argument, "kmeans: no points");
  if (d == 0) fail(ErrorKind::invalid_argument, "kmeans: the points have 0 dimensions");
  if (k < 1) fail(ErrorKind::invalid_argument, "kmeans: k must be at least 1, got ", k);
  if (k > n) fail(ErrorKind::invalid_argument, "kmeans: k = ", k, " is more than the number of points (", n, ")");
  if (o.max_iter < 1 || o.n_init < 1 || !(o.tol >= 0) || o.max_points_per_centroid < 0)
    fail(ErrorKind::invalid_argument, "kmeans: max_iter and n_init must be at least 1, tol and max_points_per_centroid at least 0");
  const float* xp = x.data<float>();
  for (int64_t i = 0; i < n * d; ++i)
    if (!std::isfinite(xp[i])) fail(ErrorKind::invalid_argument, "kmeans: point ", i / d, " contains NaN or Inf");
  if (o.init == KMeansOptions::Init::given &&
      (o.initial_centroids.dtype() != DType::f32 || o.initial_centroids.shape() != Shape{k, d}))
    fail(ErrorKind::invalid_argument, "kmeans: given centroids must be f32 ", shape_str({k, d}), ", got ", dtype_name(o.initial_centroids.dtype()), " ",
         shape_str(o.initial_centroids.shape()));

  Rng rng(o.seed, kStream);
  // Training sample (faiss): at most k * max_points_per_centroid points. Compared as n / k so a
  // huge cap (no sampling) cannot overflow the product.
  const bool sample = o.max_points_per_centroid > 0 && o.max_points_per_centroid <= (n - 1) / k;
  const Tensor train = sample
                           ? gather_rows(x, sample_indices(n, k * o.max_points_per_centroid, rng))
                           : x;
  const int64_t m = train.dim(0);
  // scikit-learn's tolerance: tol times the mean variance of the features.
  double mean_var = 0;
  const float* tp = train.data<float>();
  for (int64_t t = 0; t < d; ++t) {
    double s = 0, s2 = 0;
    for (int64_t i = 0; i < m; ++i) {
      const double v = tp[i * d + t];
      s += v, s2 += v * v;
    }
    mean_var += s2 / double(m) - (s / double(m)) * (s / double(m));
  }
  const double tol = o.tol * mean_var / double(d);

  KMeansResult best;
  best.inertia = INFINITY;
  Tensor labels = Tensor::empty({m}, DType::i32), dist = Tensor::empty({m}, DType::f32);
  Tensor sums = Tensor::empty({k, d}, DType::f64), counts = Tensor::empty({k}, DType::i64);
  for (int init = 0; init < o.n_init; ++init) {
    Tensor centroids = o.init == KMeansOptions::Init::given ? o.initial_centroids.clone()
                     : o.init == KMeansOptions::Init::random ? gather_rows(train, sample_indices(m, k, rng))
                                                            : kmeanspp(disp, train, k, rng);
    if (o.spherical) normalise_rows(centroids);
    KMeansResult r;
    for (int it = 1; it <= o.max_iter; ++it) {
      disp.kmeans_assign(train, centroids, labels, dist);
      disp.kmeans_update(train, labels, sums, counts);
      // Empty clusters move to the points farthest from their centroids (scikit-learn's repair).
      std::vector<int64_t> empty;
      for (int64_t j = 0; j < k; ++j)
        if (counts.data<int64_t>()[j] == 0) empty.push_back(j);
      std::vector<int64_t> far;
      if (!empty.empty()) {
        std::vector<int64_t> order(static_cast<size_t>(m));
        std::iota(order.begin(), order.end(), 0);
        std::partial_sort(order.begin(), order.begin() + int64_t(empty.size()), order.end(),
                          [dp = dist.data<float>()](int64_t a, int64_t b) { return dp[a] > dp[b]; });
        far.assign(order.begin(), order.begin() + int64_t(empty.size()));
      }
      Tensor next = Tensor::empty({k, d}, DType::f32);
      float* np_ = next.data<float>();
      const double* sp = sums.data<double>();
      const int64_t* cntp = counts.data<int64_t>();
      for (int64_t j = 0, e = 0; j < k; ++j) {
        const int64_t c = cntp[j];
        for (int64_t t = 0; t < d; ++t) np_[j * d + t] = c > 0 ? float(sp[j * d + t] / double(c)) : tp[far[size_t(e)] * d + t];
        if (c == 0) ++e;
      }
      if (o.spherical) normalise_rows(next);
      double shift = 0;
      const float* cp = centroids.data<float>();
      for (int64_t i = 0; i < k * d; ++i) {
        const double delta = double(np_[i]) - cp[i];
        shift += delta * delta;
      }
      centroids = next;
      r.iterations = it;
      if (shift <= tol) {
        r.converged = true;
        break;
      }
    }
    // Labels and inertia over every point, not only the training sample.
    Tensor all_labels = Tensor::empty({n}, DType::i32), all_dist = Tensor::empty({n}, DType::f32);
    disp.kmeans_assign(x, centroids, all_labels, all_dist);
    double inertia = 0;
    const float* adp = all_dist.data<float>();
    for (int64_t i = 0; i < n; ++i) inertia += adp[i];
    if (inertia < best.inertia) {
      best = r;
      best.inertia = inertia;
      best.centroids = centroids;
      best.labels = all_labels;
    }
  }
  return best;
}

}  // namespace hybrit
