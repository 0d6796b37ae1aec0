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
  const float* xp = x.data<float>();
  float* op = out.data<float>();
  for (size_t i = 0; i < rows.size(); ++i) std::memcpy(op + int64_t(i) * d, xp + rows[i] * d, size_t(d) * sizeof(float));
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
  if (n == 0) return {};
  Tensor dots = Tensor::empty({n, c}, DType::f32);
  disp.matmul(x, cand, dots, {false, true, 1.0f, 0.0f});
  const std::vector<double> cn = row_norms(cand);
  std::vector<double> out(static_cast<size_t>(n * c));
  const float* dp = dots.data<float>();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < c; ++j) out[size_t(i * c + j)] = std::max(0.0, xn[size_t(i)] + cn[size_t(j)] - 2.0 * dp[i * c + j]);
  return out;
}

// The training points of a k-means, which the ranks of a job hold in consecutive pieces (one
// process holds them all): this rank's rows, where they start in the whole, and the sums that
// make every rank see the whole. Every member returns the same on every rank.
struct Points {
  Comm* comm;            // null: one process
  Tensor local;          // (rows here, d)
  int64_t begin = 0;     // the first local row's position in the whole
  int64_t total = 0;     // rows in the whole
  std::vector<int64_t> offsets;  // where each rank's rows start (size + 1)

  Points(Comm* c, Tensor rows) : comm(c), local(std::move(rows)) {
    offsets = row_offsets(comm, local.dim(0));
    begin = offsets[size_t(rank())];
    total = offsets.back();
  }
  int64_t rows() const { return local.dim(0); }
  int rank() const { return comm ? comm->rank() : 0; }
  int ranks() const { return comm ? comm->size() : 1; }
  bool mine(int64_t position) const { return position >= begin && position < begin + rows(); }
  void sum(double* p, int64_t n) const { if (comm) comm->allreduce_sum(p, n); }
  void sum(int64_t* p, int64_t n) const { if (comm) comm->allreduce_sum(p, n); }
  double sum(double v) const { sum(&v, 1); return v; }
  // The rows at `positions` of the whole, on every rank: the rank holding each fills it in and
  // the others add zeros (exact).
  Tensor rows_at(const std::vector<int64_t>& positions) const {
    const int64_t d = local.dim(1);
    Tensor out = Tensor::zeros({int64_t(positions.size()), d}, DType::f32);
    float* op = out.data<float>();
    const float* lp = local.data<float>();
    for (size_t i = 0; i < positions.size(); ++i)
      if (mine(positions[i])) std::memcpy(op + int64_t(i) * d, lp + (positions[i] - begin) * d, size_t(d) * sizeof(float));
    if (comm) comm->allreduce_sum(op, out.numel());
    return out;
  }
};

// Greedy k-means++ (Arthur and Vassilvitskii; the greedy variant of scikit-learn): each new
// centroid is the best of 2 + floor(ln k) candidates drawn in proportion to D^2. Over ranks the
// draw is the one a single process makes: the cumulative D^2 runs over the whole in order, each
// rank holding a consecutive piece of it.
Tensor kmeanspp(Dispatcher& disp, const Points& pts, int64_t k, Rng& rng) {
  const Tensor& x = pts.local;
  const int64_t n = pts.rows(), m = pts.total;
  const int size = pts.ranks(), rank = pts.rank();
  const int trials = 2 + int(std::log(double(k)));
  const std::vector<double> xn = row_norms(x);
  std::vector<int64_t> chosen = {int64_t(rng.below(uint64_t(m)))};
  std::vector<double> closest = distances_to(disp, x, xn, pts.rows_at(chosen));
  double potential = pts.sum(std::accumulate(closest.begin(), closest.end(), 0.0));
  std::vector<double> cumulative(static_cast<size_t>(n));
  std::vector<double> rank_end(static_cast<size_t>(size));
  for (int64_t c = 1; c < k; ++c) {
    std::partial_sum(closest.begin(), closest.end(), cumulative.begin());
    // Where each rank's piece of the cumulative sum ends.
    std::fill(rank_end.begin(), rank_end.end(), 0.0);
    rank_end[size_t(rank)] = n ? cumulative.back() : 0.0;
    pts.sum(rank_end.data(), size);
    std::partial_sum(rank_end.begin(), rank_end.end(), rank_end.begin());
    std::vector<int64_t> cand(static_cast<size_t>(trials), 0);
    for (auto& id : cand) {
      const double r = double(rng.uniform()) * potential;
      const int owner = int(std::upper_bound(rank_end.begin(), rank_end.end(), r) - rank_end.begin());
      if (owner == size) {
        if (rank == 0) id = m - 1;  // r at the very end (rounding): the last point, as one process takes it
      } else if (owner == rank) {
        const double start = rank == 0 ? 0.0 : rank_end[size_t(rank) - 1];
        id = pts.begin + std::min<int64_t>(n - 1, std::upper_bound(cumulative.begin(), cumulative.end(), r - start) - cumulative.begin());
      }
    }
    pts.sum(cand.data(), trials);  // each position came from one rank, the others gave 0
    const std::vector<double> dist = distances_to(disp, x, xn, pts.rows_at(cand));
    std::vector<double> pot(static_cast<size_t>(trials), 0.0);
    for (int t = 0; t < trials; ++t)
      for (int64_t i = 0; i < n; ++i) pot[size_t(t)] += std::min(closest[size_t(i)], dist[size_t(i * trials + t)]);
    pts.sum(pot.data(), trials);
    int best = 0;
    double best_pot = INFINITY;
    for (int t = 0; t < trials; ++t)
      if (pot[size_t(t)] < best_pot) best_pot = pot[size_t(t)], best = t;
    for (int64_t i = 0; i < n; ++i) closest[size_t(i)] = std::min(closest[size_t(i)], dist[size_t(i * trials + best)]);
    potential = best_pot;
    chosen.push_back(cand[size_t(best)]);
  }
  return pts.rows_at(chosen);
}

// The `count` points of the whole farthest from their centroids (ties: the earlier point), for
// the empty clusters: each rank offers its own farthest, and every rank picks from all offers.
std::vector<int64_t> farthest_points(const Points& pts, const Tensor& dist, int64_t count) {
  const int size = pts.ranks(), rank = pts.rank();
  const int64_t n = pts.rows();
  auto farther = [](const std::pair<double, int64_t>& a, const std::pair<double, int64_t>& b) {
    return a.first != b.first ? a.first > b.first : a.second < b.second;
  };
  std::vector<std::pair<double, int64_t>> own;
  const float* dp = dist.data<float>();
  for (int64_t i = 0; i < n; ++i) own.push_back({dp[i], pts.begin + i});
  const int64_t offered = std::min(count, n);
  std::partial_sort(own.begin(), own.begin() + offered, own.end(), farther);
  std::vector<double> offer_dist(size_t(size * count), 0.0);
  std::vector<int64_t> offer_pos(size_t(size * count), 0), offer_count(size_t(size), 0);
  for (int64_t i = 0; i < offered; ++i) offer_dist[size_t(rank * count + i)] = own[size_t(i)].first, offer_pos[size_t(rank * count + i)] = own[size_t(i)].second;
  offer_count[size_t(rank)] = offered;
  pts.sum(offer_dist.data(), int64_t(offer_dist.size()));
  pts.sum(offer_pos.data(), int64_t(offer_pos.size()));
  pts.sum(offer_count.data(), size);
  std::vector<std::pair<double, int64_t>> all;
  for (int r = 0; r < size; ++r)
    for (int64_t i = 0; i < offer_count[size_t(r)]; ++i) all.push_back({offer_dist[size_t(r * count + i)], offer_pos[size_t(r * count + i)]});
  std::sort(all.begin(), all.end(), farther);
  std::vector<int64_t> out;
  for (int64_t i = 0; i < count; ++i) out.push_back(all[size_t(i)].second);
  return out;
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

KMeansResult kmeans(Dispatcher& disp, const Tensor& x, const KMeansOptions& o, Comm* comm) {
  if (comm && !comm->distributed()) comm = nullptr;
  if (x.dtype() != DType::f32 || x.ndim() != 2) fail(ErrorKind::invalid_argument, "kmeans: points must be a 2-D f32 matrix, got ", dtype_name(x.dtype()), " ", shape_str(x.shape()));
  const int64_t d = x.dim(1), k = o.k;
  const Points all(comm, x);  // every point; the training sample below may be fewer
  const int64_t n = all.total, first = all.begin;
  if (n == 0) fail(ErrorKind::invalid_argument, "kmeans: no points");
  if (d == 0) fail(ErrorKind::invalid_argument, "kmeans: the points have 0 dimensions");
  if (k < 1) fail(ErrorKind::invalid_argument, "kmeans: k must be at least 1, got ", k);
  if (k > n) fail(ErrorKind::invalid_argument, "kmeans: k = ", k, " is more than the number of points (", n, ")");
  if (o.max_iter < 1 || o.n_init < 1 || !(o.tol >= 0) || o.max_points_per_centroid < 0)
    fail(ErrorKind::invalid_argument, "kmeans: max_iter and n_init must be at least 1, tol and max_points_per_centroid at least 0");
  const float* xp = x.data<float>();
  for (int64_t i = 0; i < x.numel(); ++i)
    if (!std::isfinite(xp[i])) fail(ErrorKind::invalid_argument, "kmeans: point ", first + i / d, " contains NaN or Inf");
  if (o.init == KMeansOptions::Init::given &&
      (o.initial_centroids.dtype() != DType::f32 || o.initial_centroids.shape() != Shape{k, d}))
    fail(ErrorKind::invalid_argument, "kmeans: given centroids must be f32 ", shape_str({k, d}), ", got ", dtype_name(o.initial_centroids.dtype()), " ",
         shape_str(o.initial_centroids.shape()));

  Rng rng(o.seed, kStream);
  // Training sample (faiss): at most k * max_points_per_centroid points, in the order of the
  // whole (so over ranks each holds a consecutive piece of the sample, the piece of its rows).
  // Compared as n / k so a huge cap (no sampling) cannot overflow the product.
  const bool sample = o.max_points_per_centroid > 0 && o.max_points_per_centroid <= (n - 1) / k;
  Tensor train_rows = x;
  if (sample) {
    std::vector<int64_t> picked = sample_indices(n, k * o.max_points_per_centroid, rng), local;
    std::sort(picked.begin(), picked.end());
    for (int64_t i : picked)
      if (all.mine(i)) local.push_back(i - first);
    train_rows = gather_rows(x, local);
  }
  const Points train(comm, train_rows);
  const int64_t m = train.total, ml = train.rows();
  // scikit-learn's tolerance: tol times the mean variance of the features.
  std::vector<double> moments(size_t(2 * d), 0.0);  // per feature: sum, sum of squares
  const float* tp = train.local.data<float>();
  for (int64_t t = 0; t < d; ++t)
    for (int64_t i = 0; i < ml; ++i) {
      const double v = tp[i * d + t];
      moments[size_t(t)] += v, moments[size_t(d + t)] += v * v;
    }
  train.sum(moments.data(), 2 * d);
  double mean_var = 0;
  for (int64_t t = 0; t < d; ++t) {
    const double s = moments[size_t(t)], s2 = moments[size_t(d + t)];
    mean_var += s2 / double(m) - (s / double(m)) * (s / double(m));
  }
  const double tol = o.tol * mean_var / double(d);

  KMeansResult best;
  best.inertia = INFINITY;
  Tensor labels = Tensor::empty({ml}, DType::i32), dist = Tensor::empty({ml}, DType::f32);
  Tensor sums = Tensor::zeros({k, d}, DType::f64), counts = Tensor::zeros({k}, DType::i64);
  for (int init = 0; init < o.n_init; ++init) {
    Tensor centroids = o.init == KMeansOptions::Init::given ? o.initial_centroids.clone()
                     : o.init == KMeansOptions::Init::random ? train.rows_at(sample_indices(m, k, rng))
                                                            : kmeanspp(disp, train, k, rng);
    if (o.spherical) normalise_rows(centroids);
    KMeansResult r;
    for (int it = 1; it <= o.max_iter; ++it) {
      if (ml > 0) {
        disp.kmeans_assign(train.local, centroids, labels, dist);
        disp.kmeans_update(train.local, labels, sums, counts);  // this rank's sums, from zero
      } else {
        std::fill(sums.data<double>(), sums.data<double>() + k * d, 0.0);
        std::fill(counts.data<int64_t>(), counts.data<int64_t>() + k, int64_t(0));
      }
      train.sum(sums.data<double>(), k * d);
      train.sum(counts.data<int64_t>(), k);
      // Empty clusters move to the points farthest from their centroids (scikit-learn's repair).
      int64_t empty = 0;
      const int64_t* count_of = counts.data<int64_t>();
      for (int64_t j = 0; j < k; ++j) empty += count_of[j] == 0;
      const Tensor far = empty ? train.rows_at(farthest_points(train, dist, empty)) : Tensor();
      Tensor next = Tensor::empty({k, d}, DType::f32);
      float* np_ = next.data<float>();
      const double* sp = sums.data<double>();
      const int64_t* cntp = counts.data<int64_t>();
      for (int64_t j = 0, e = 0; j < k; ++j) {
        const int64_t c = cntp[j];
        if (c > 0) {
          for (int64_t t = 0; t < d; ++t) np_[j * d + t] = float(sp[j * d + t] / double(c));
        } else {
          std::memcpy(np_ + j * d, far.data<float>() + e * d, size_t(d) * sizeof(float));
          ++e;
        }
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
    Tensor all_labels = Tensor::empty({x.dim(0)}, DType::i32), all_dist = Tensor::empty({x.dim(0)}, DType::f32);
    if (x.dim(0) > 0) disp.kmeans_assign(x, centroids, all_labels, all_dist);
    double inertia = 0;
    const float* adp = all_dist.data<float>();
    for (int64_t i = 0; i < x.dim(0); ++i) inertia += adp[i];
    inertia = train.sum(inertia);
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
