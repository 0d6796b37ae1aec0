// The oneTBB backend. Every partition depends only on the sizes, never on the thread count, so
// results are the same bits with any number of threads. Element-wise ops and kmeans_assign run
// the C backend's kernels over fixed chunks (bit-identical to the C backend); kmeans_update sums
// fixed row parts (see there); matmul runs Eigen's GEMM, one block of C per task.
#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>
#include <tbb/partitioner.h>
#include <tbb/task_arena.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <vector>

#include "backends/backend.hpp"
#include "backends/c/hybrit_c.h"

namespace hybrit {

using EigenGemm = void (*)(bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t,
                           float, float*, int64_t);
void eigen_sgemm_generic(bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t, float, float*, int64_t);
void eigen_sgemm_avx2(bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t, float, float*, int64_t);
void eigen_sgemm_avx512(bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t, float, float*, int64_t);

namespace {

constexpr int64_t kElementGrain = 1 << 16;  // elements per task for streaming ops
constexpr int64_t kAssignGrain = 1024;       // points per task; a multiple of the C kernel's block (256)

// matmul_ternary's pieces: bytes of packed weights (times activation rows) per task.
constexpr int64_t kTernaryTaskBytes = int64_t(1) << 15;

// Runs body(begin, end) over [0, n) in pieces of `grain` (the last may be shorter). Each piece
// has fixed bounds, so which thread runs it does not change any result.
template <class Body>
void for_chunks(int64_t n, int64_t grain, const Body& body) {
  const int64_t pieces = (n + grain - 1) / grain;
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, pieces, 1), [&](const tbb::blocked_range<int64_t>& r) {
    for (int64_t p = r.begin(); p != r.end(); ++p) body(p * grain, std::min(n, (p + 1) * grain));
  }, tbb::simple_partitioner());
}

class TbbBackend final : public Backend {
 public:
  TbbBackend(SimdLevel level, int threads)
      : level_(level), threads_(threads), arena_(threads), kr_(hybrit_c_kernels_for(static_cast<hybrit_isa>(level))) {
    gemm_ = level == SimdLevel::avx512 ? eigen_sgemm_avx512 : level == SimdLevel::avx2 ? eigen_sgemm_avx2 : eigen_sgemm_generic;
  }
  BackendKind kind() const override { return BackendKind::tbb; }
  std::string describe() const override { return cat("tbb (", threads_, " threads, kernels and Eigen for ", to_string(level_), ")"); }
  bool computes_on_host() const override { return true; }

 protected:
  float run_quantize_ternary(const Tensor& wt, Tensor& qt) override {
    const float* w = wt.data<float>();
    int8_t* q = qt.data<int8_t>();
    const int64_t n = wt.numel(), chunks = (n + HYBRIT_SUM_CHUNK - 1) / HYBRIT_SUM_CHUNK;
    std::vector<double> sums(std::max<int64_t>(chunks, 1));
    const int64_t chunks_per_task = kElementGrain / HYBRIT_SUM_CHUNK;
    arena_.execute([&] {
      for_chunks(chunks, chunks_per_task, [&](int64_t c0, int64_t c1) {
        kr_->chunk_abs_sums(w + c0 * HYBRIT_SUM_CHUNK, std::min(n, c1 * HYBRIT_SUM_CHUNK) - c0 * HYBRIT_SUM_CHUNK, sums.data() + c0);
      });
    });
    const double total = hybrit_c_fold_sums(sums.data(), chunks);
    if (!std::isfinite(total)) raise_kernel_status(HYBRIT_C_NONFINITE, Op::quantize_ternary, hybrit_c_first_nonfinite(w, n), w);
    const float s = hybrit_c_ternary_scale(total, n), t = hybrit_c_ternary_threshold(s);
    arena_.execute([&] { for_chunks(n, kElementGrain, [&](int64_t i0, int64_t i1) { kr_->ternary_pass(w + i0, i1 - i0, s, t, q + i0); }); });
    return s;
  }

  void run_quantize_int8_rows(const Tensor& xt, int64_t rows, int64_t cols, Tensor& qt, Tensor& st) override {
    const float* x = xt.data<float>();
    int8_t* q = qt.data<int8_t>();
    float* scales = st.data<float>();
    const int64_t rows_per_task = std::max<int64_t>(1, kElementGrain / std::max<int64_t>(cols, 1));
    std::vector<int64_t> bad_rows((rows + rows_per_task - 1) / rows_per_task, -1);
    arena_.execute([&] {
      for_chunks(rows, rows_per_task, [&](int64_t r0, int64_t r1) {
        int64_t bad = -1;
        if (hybrit_c_quantize_int8_rows(kr_, x + r0 * cols, r1 - r0, cols, q + r0 * cols, scales + r0, &bad) != HYBRIT_C_OK)
          bad_rows[r0 / rows_per_task] = r0 + bad;
      });
    });
    for (int64_t bad : bad_rows)
      if (bad >= 0) raise_kernel_status(HYBRIT_C_NONFINITE, Op::quantize_int8_rows, bad);
  }

  // Packing is split into groups of whole rows, or a long row into column blocks of a multiple of 4.
  void run_pack_ternary(const Tensor& qt, int64_t rows, int64_t cols, Tensor& pt) override {
    run_packing(rows, cols, Op::pack_ternary, [&](int64_t r, int64_t nr, int64_t j0, int64_t nc, int64_t* bad) {
      return hybrit_c_pack_ternary(qt.data<int8_t>() + r * cols + j0, nr, nc, pt.data<uint8_t>() + r * hybrit_packed_cols(cols) + j0 / 4, bad);
    });
  }
  void run_unpack_ternary(const Tensor& pt, int64_t rows, int64_t cols, Tensor& qt) override {
    run_packing(rows, cols, Op::unpack_ternary, [&](int64_t r, int64_t nr, int64_t j0, int64_t nc, int64_t* bad) {
      return hybrit_c_unpack_ternary(pt.data<uint8_t>() + r * hybrit_packed_cols(cols) + j0 / 4, nr, nc, qt.data<int8_t>() + r * cols + j0, bad);
    });
  }

  void run_matmul(const Tensor& at, const Tensor& bt, Tensor& ct, int64_t m, int64_t n, int64_t k, const MatmulArgs& args) override {
    const float* a = at.data<float>();
    const float* b = bt.data<float>();
    float* c = ct.data<float>();
    const int64_t lda = at.dim(1), ldb = bt.dim(1);
    if (k >= kSplitKMin && k >= 8 * std::max(m, n)) return run_matmul_split_k(a, b, c, m, n, k, lda, ldb, args);
    // Blocks of C, none thinner than 32 rows or 64 columns. Their number depends on the sizes
    // alone, never on the thread count: Eigen's cache blocking (and so each element's summation
    // order) follows the block's shape, so a count taken from the threads would change the bits
    // with HYBRIT_THREADS. 8 keeps up to 4 threads busy (x2 for balance) at the speed of the old
    // thread-count rule on 2 cores (measured: within 3% at the training shapes); more cores get at
    // most 8 blocks of one GEMM (a size-based count for large products is the next step).
    constexpr int64_t want = 8;
    int64_t mb = std::clamp<int64_t>(m / 32, 1, want), nb = std::clamp<int64_t>(want / mb, 1, std::max<int64_t>(1, n / 64));
    if (2.0 * double(m) * n * k < 2e6) mb = nb = 1;  // too small to repay a task
    const int64_t bm = (m + mb - 1) / mb, bn = (n + nb - 1) / nb;
    arena_.execute([&] {
      tbb::parallel_for(tbb::blocked_range<int64_t>(0, mb * nb, 1), [&](const tbb::blocked_range<int64_t>& r) {
        for (int64_t blk = r.begin(); blk != r.end(); ++blk) {
          const int64_t i0 = (blk / nb) * bm, j0 = (blk % nb) * bn;
          const int64_t mi = std::min(bm, m - i0), nj = std::min(bn, n - j0);
          if (mi <= 0 || nj <= 0) continue;
          const float* ab = args.trans_a ? a + i0 : a + i0 * lda;
          const float* bb = args.trans_b ? b + j0 * ldb : b + j0;
          gemm_(args.trans_a, args.trans_b, mi, nj, k, args.alpha, ab, lda, bb, ldb, args.beta, c + i0 * n + j0, n);
        }
      }, tbb::simple_partitioner());
    });
  }

  // A long inner dimension with a small C (the weight gradients dW = dy^T x, k = tokens): blocks
  // of C would each re-pack the whole of the other operand, so the k axis is cut instead, into a
  // number of parts fixed by k alone; each part multiplies into a private C, and the parts are
  // added in part order (the same bits on any thread count).
  static constexpr int64_t kSplitKMin = 4096, kSplitKPart = 2048, kSplitKMaxParts = 8;
  void run_matmul_split_k(const float* a, const float* b, float* c, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb,
                          const MatmulArgs& args) {
    const int64_t parts = std::min(kSplitKMaxParts, k / kSplitKPart), per = (k + parts - 1) / parts;
    // Every part is written whole before it is read, so the scratch's old contents never show.
    float* partial = thread_scratch(Scratch::split_k, size_t(parts * m * n));
    arena_.execute([&] {
      for_chunks(parts, 1, [&](int64_t p, int64_t) {
        const int64_t k0 = p * per, kk = std::min(per, k - k0);
        const float* ap = args.trans_a ? a + k0 * lda : a + k0;
        const float* bp = args.trans_b ? b + k0 : b + k0 * ldb;
        gemm_(args.trans_a, args.trans_b, m, n, kk, args.alpha, ap, lda, bp, ldb, 0.0f, partial + p * m * n, n);
      });
      for_chunks(m * n, kElementGrain, [&](int64_t e0, int64_t e1) {
        for (int64_t e = e0; e < e1; ++e) {
          float sum = partial[size_t(e)];
          for (int64_t p = 1; p < parts; ++p) sum += partial[size_t(p * m * n + e)];
          c[e] = args.beta == 0.0f ? sum : args.beta * c[e] + sum;
        }
      });
    });
  }

  void run_kmeans_assign(const Tensor& xt, const Tensor& ct, Tensor& lt, Tensor& dt) override {
    const int64_t n = xt.dim(0), d = xt.dim(1), k = ct.dim(0);
    std::vector<int64_t> bad_points((n + kAssignGrain - 1) / kAssignGrain, INT64_MIN);
    arena_.execute([&] {
      for_chunks(n, kAssignGrain, [&](int64_t i0, int64_t i1) {
        int64_t bad = -1;
        if (hybrit_c_kmeans_assign(kr_, xt.data<float>() + i0 * d, i1 - i0, d, ct.data<float>(), k, lt.data<int32_t>() + i0,
                                   dt.data<float>() + i0, &bad) != HYBRIT_C_OK)
          bad_points[i0 / kAssignGrain] = bad < 0 ? bad : i0 + bad;
      });
    });
    for (int64_t bad : bad_points)
      if (bad != INT64_MIN) raise_kernel_status(HYBRIT_C_NONFINITE, Op::kmeans_assign, bad);
  }

  // Rows are split into a fixed number of parts (it depends only on the sizes, never on the
  // thread count), each summing into private f64 partials that are then added in part order:
  // the same bits for any number of threads, and each thread streams its rows contiguously (the
  // faiss scheme). Where partials would not fit the memory budget, each (cluster, dimension) sum
  // runs over its points in point order instead, exactly as the C backend: wide points split by
  // column slices, narrow ones bucketed by label with a stable counting sort.
  // Activations into block order once, then output columns (weight rows) in fixed pieces: integer
  // dot products, so the result is the c backend's, bit for bit, on any thread count.
  void run_matmul_ternary(const Tensor& xq, const Tensor& x_scales, const Tensor& w_packed, float w_scale, Tensor& y, int64_t m, int64_t n,
                          int64_t k) override {
    const int64_t kp = hybrit_ternary_padded(k);
    std::vector<int8_t> blocked(size_t(m * kp) + 64);
    std::vector<int64_t> sums(size_t(std::max<int64_t>(m, 1)));
    const bool amx = hybrit_c_ternary_uses_amx(kr_, m);
    std::vector<int8_t> tiled(amx ? size_t(hybrit_ternary_amx_bytes(m, k)) : 0);
    // Weight rows per task: about kTernaryTaskBytes of packed weights times the activation rows (at
    // most 4 counted), in whole units of the kernel (4-row tiles; 32-row panels on AMX). Small
    // pieces, so a decode step's matrices (a few hundred KiB each) keep every thread streaming
    // weights to the end; the pieces cannot change a result (each output is its own integer dot).
    const int64_t unit = amx ? 32 : 4, per_row = std::max<int64_t>(1, hybrit_packed_cols(k) * (amx ? 1 : std::min<int64_t>(m, 4)));
    const int64_t grain = std::max<int64_t>(unit, kTernaryTaskBytes / per_row / unit * unit);
    std::atomic<int> status{HYBRIT_C_OK};
    arena_.execute([&] {
      for_chunks(m, 16, [&](int64_t i0, int64_t i1) {
        hybrit_c_ternary_prepare(xq.data<int8_t>() + i0 * k, i1 - i0, k, blocked.data() + i0 * kp, sums.data() + i0);
      });
      if (amx)  // the activations into tile layout once, 16 rows a tile
        for_chunks((m + 15) / 16, 1, [&](int64_t t0, int64_t t1) { hybrit_c_ternary_amx_layout(blocked.data(), m, k, tiled.data(), t0, t1); });
      for_chunks(n, grain, [&](int64_t r0, int64_t r1) {
        if (amx) {
          const int s = hybrit_c_ternary_rows_amx(tiled.data(), sums.data(), x_scales.data<float>(), m, k, w_packed.data<uint8_t>(), w_scale, r0,
                                                  r1, y.data<float>(), n);
          if (s != HYBRIT_C_OK) status = s;
        } else {
          hybrit_c_ternary_rows(kr_, blocked.data(), sums.data(), x_scales.data<float>(), m, k, w_packed.data<uint8_t>(), w_scale, r0, r1,
                                y.data<float>(), n);
        }
      });
    });
    if (status != HYBRIT_C_OK) raise_kernel_status(status, Op::matmul_ternary, 0);
  }
  void run_kmeans_update(const Tensor& xt, const Tensor& lt, Tensor& st, Tensor& ctt) override {
    const float* x = xt.data<float>();
    const int32_t* labels = lt.data<int32_t>();
    double* sums = st.data<double>();
    int64_t* counts = ctt.data<int64_t>();
    const int64_t n = xt.dim(0), d = xt.dim(1), k = st.dim(0);
    std::fill(counts, counts + k, 0);
    for (int64_t i = 0; i < n; ++i) {
      if (labels[i] < 0 || labels[i] >= k) raise_kernel_status(HYBRIT_C_BADVALUE, Op::kmeans_update, i);
      ++counts[labels[i]];
    }
    std::fill(sums, sums + k * d, 0.0);
    constexpr int64_t kMaxParts = 8, kPartialBudget = 64ll << 20, kMinRowsPerPart = 4096;
    const int64_t parts = std::min({kMaxParts, kPartialBudget / std::max<int64_t>(1, k * d * 8), n / kMinRowsPerPart});
    if (parts >= 2) {
      std::vector<double> partial(size_t(parts * k * d), 0.0);
      const int64_t rows_per_part = (n + parts - 1) / parts;
      arena_.execute([&] {
        for_chunks(parts, 1, [&](int64_t part, int64_t) {
          double* acc_base = partial.data() + part * k * d;
          for (int64_t i = part * rows_per_part; i < std::min(n, (part + 1) * rows_per_part); ++i) {
            double* acc = acc_base + int64_t(labels[i]) * d;
            const float* row = x + i * d;
            for (int64_t j = 0; j < d; ++j) acc[j] += double(row[j]);
          }
        });
        // Combine in part order, split over the output so threads share the work.
        for_chunks(k * d, kElementGrain, [&](int64_t e0, int64_t e1) {
          for (int64_t part = 0; part < parts; ++part) {
            const double* src = partial.data() + part * k * d;
            for (int64_t e = e0; e < e1; ++e) sums[e] += src[e];
          }
        });
      });
    } else if (d >= 16) {
      // Slices of whole cache lines of sums (8 doubles), one or more per thread.
      const int64_t width = std::max<int64_t>(8, ((d + threads_ - 1) / threads_ + 7) / 8 * 8), slices = (d + width - 1) / width;
      arena_.execute([&] {
        for_chunks(slices, 1, [&](int64_t s, int64_t) {
          const int64_t j0 = s * width, j1 = std::min(d, j0 + width);
          for (int64_t i = 0; i < n; ++i) {
            double* acc = sums + int64_t(labels[i]) * d;
            const float* row = x + i * d;
            for (int64_t j = j0; j < j1; ++j) acc[j] += double(row[j]);
          }
        });
      });
    } else {
      std::vector<int64_t> start(k + 1, 0);
      for (int64_t c = 0; c < k; ++c) start[c + 1] = start[c] + counts[c];
      std::vector<int64_t> order(n), next(start.begin(), start.end() - 1);
      for (int64_t i = 0; i < n; ++i) order[next[labels[i]]++] = i;
      arena_.execute([&] {
        tbb::parallel_for(tbb::blocked_range<int64_t>(0, k), [&](const tbb::blocked_range<int64_t>& r) {
          for (int64_t c = r.begin(); c != r.end(); ++c) {
            double* acc = sums + c * d;
            for (int64_t p = start[c]; p < start[c + 1]; ++p) {
              const float* row = x + order[p] * d;
              for (int64_t j = 0; j < d; ++j) acc[j] += double(row[j]);
            }
          }
        });
      });
    }
    for (int64_t i = 0; i < k * d; ++i)
      if (!std::isfinite(sums[i]))
        raise_kernel_status(HYBRIT_C_NONFINITE, Op::kmeans_update, hybrit_c_first_nonfinite(x, n * d) / std::max<int64_t>(d, 1));
  }

  // Units (sequence x head) in fixed pieces, each piece with its own scratch: the C kernel's
  // results, bit for bit, on any thread count.
  void run_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionShape& sh, Tensor& out, Tensor& lse) override {
    const hybrit_attention_shape s = c_attention_shape(sh);
    run_attention_units(s, sh.batch * sh.heads, [&](int64_t u0, int64_t u1, float* w) {
      hybrit_c_attention_forward(kr_, &s, q.data<float>(), k.data<float>(), v.data<float>(), out.data<float>(), lse.data<float>(), u0, u1, w);
    });
  }
  void run_attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& dout, const Tensor& lse,
                              const AttentionShape& sh, Tensor& dq, Tensor& dk, Tensor& dv) override {
    const hybrit_attention_shape s = c_attention_shape(sh);
    run_attention_units(s, sh.batch * sh.kv_heads, [&](int64_t u0, int64_t u1, float* w) {
      hybrit_c_attention_backward(kr_, &s, q.data<float>(), k.data<float>(), v.data<float>(), out.data<float>(), dout.data<float>(),
                                  lse.data<float>(), dq.data<float>(), dk.data<float>(), dv.data<float>(), u0, u1, w);
    });
  }

  void parallel_for(int64_t n, int64_t grain, const RangeBody& body) override {
    grain = std::max<int64_t>(grain, 1);
    if (n <= grain) {  // one piece: no task to schedule
      if (n > 0) body(0, n);
      return;
    }
    arena_.execute([&] { for_chunks(n, grain, body); });
  }
  int threads() const override { return threads_; }

 private:
  template <class Kernel>
  void run_attention_units(const hybrit_attention_shape& s, int64_t units, const Kernel& kernel) {
    const size_t floats = size_t(hybrit_c_attention_workspace(kr_, &s));
    arena_.execute([&] {
      for_chunks(units, 1, [&](int64_t u0, int64_t u1) { kernel(u0, u1, thread_scratch(Scratch::attention, floats)); });
    });
  }

  // Scratch of the calling thread that only grows (64-byte aligned), one buffer per use so that
  // no use can clobber another's: a fresh multi-megabyte allocation per call would be mapped,
  // zeroed, page-faulted and unmapped every time.
  enum class Scratch { split_k = 0, attention = 1 };
  static float* thread_scratch(Scratch use, size_t floats) {
    struct Free {
      void operator()(float* p) const { std::free(p); }
    };
    struct Buffer {
      std::unique_ptr<float, Free> memory;
      size_t capacity = 0;
    };
    thread_local Buffer buffers[2];
    Buffer& b = buffers[int(use)];
    if (b.capacity < floats) {
      b.memory.reset(static_cast<float*>(std::aligned_alloc(64, (floats * sizeof(float) + 63) / 64 * 64)));
      b.capacity = b.memory ? floats : 0;
      if (!b.memory) fail(ErrorKind::out_of_memory, "tbb backend: out of memory for ", floats * sizeof(float), " bytes of scratch");
    }
    return b.memory.get();
  }

  // kernel(first_row, rows, first_col, cols, &bad) works on a sub-block; a block of several rows
  // always spans whole rows, so the kernel's row strides stay those of the full matrix.
  template <class Kernel>
  void run_packing(int64_t rows, int64_t cols, Op op, const Kernel& kernel) {
    if (rows == 0 || cols == 0) return;
    const bool split_rows = cols >= kElementGrain;
    const int64_t col_block = split_rows ? kElementGrain : cols;  // kElementGrain is a multiple of 4
    const int64_t per_row = (cols + col_block - 1) / col_block;
    const int64_t rows_per_task = split_rows ? 1 : std::max<int64_t>(1, kElementGrain / cols);
    const int64_t tasks = split_rows ? rows * per_row : (rows + rows_per_task - 1) / rows_per_task;
    std::vector<int64_t> bad_at(tasks, -1);
    arena_.execute([&] {
      for_chunks(tasks, 1, [&](int64_t t, int64_t) {
        const int64_t r = split_rows ? t / per_row : t * rows_per_task;
        const int64_t nr = split_rows ? 1 : std::min(rows_per_task, rows - r);
        const int64_t j0 = split_rows ? (t % per_row) * col_block : 0, nc = std::min(col_block, cols - j0);
        int64_t bad = -1;
        if (kernel(r, nr, j0, nc, &bad) != HYBRIT_C_OK) bad_at[t] = (r + bad / nc) * cols + j0 + bad % nc;
      });
    });
    for (int64_t bad : bad_at)
      if (bad >= 0) raise_kernel_status(HYBRIT_C_BADVALUE, op, bad);
  }

  SimdLevel level_;
  int threads_;
  tbb::task_arena arena_;
  const hybrit_c_kernels* kr_;
  EigenGemm gemm_;
};

}  // namespace

std::unique_ptr<Backend> make_tbb_backend(SimdLevel level, int threads) {
  const SimdLevel best = cpu_hardware().best_simd();
  if (static_cast<int>(level) > static_cast<int>(best))
    fail(ErrorKind::unsupported, "SIMD level ", to_string(level), " requested but this CPU supports at most ", to_string(best));
  if (threads <= 0) threads = cpu_hardware().granted_cpus;
  return std::make_unique<TbbBackend>(level, threads);
}

}  // namespace hybrit
