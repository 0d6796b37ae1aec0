// The plain-C backend behind the op table: one thread, the kernel table of one ISA level.
#include "backends/backend.hpp"
#include "backends/c/hybrit_c.h"

namespace hybrit {
namespace {

// Runs a kernel that reports an offending index through its last argument, then raises the
// matching Error. (The index must be read after the call: argument order is unspecified.)
template <class Kernel>
void check(Op op, const Kernel& kernel, const float* values = nullptr) {
  int64_t bad = -1;
  const int status = kernel(&bad);
  raise_kernel_status(status, op, bad, values);
}

class CBackend final : public Backend {
 public:
  explicit CBackend(SimdLevel level) : level_(level), kr_(hybrit_c_kernels_for(static_cast<hybrit_isa>(level))) {}
  BackendKind kind() const override { return BackendKind::c; }
  std::string describe() const override { return cat("c (", to_string(level_), ", 1 thread)"); }
  bool computes_on_host() const override { return true; }

 protected:
  float run_quantize_ternary(const Tensor& w, Tensor& q) override {
    float scale = 0;
    check(Op::quantize_ternary, [&](int64_t* bad) { return hybrit_c_quantize_ternary(kr_, w.data<float>(), w.numel(), q.data<int8_t>(), &scale, bad); },
          w.data<float>());
    return scale;
  }
  void run_quantize_int8_rows(const Tensor& x, int64_t rows, int64_t cols, Tensor& q, Tensor& scales) override {
    check(Op::quantize_int8_rows, [&](int64_t* bad) {
      return hybrit_c_quantize_int8_rows(kr_, x.data<float>(), rows, cols, q.data<int8_t>(), scales.data<float>(), bad);
    });
  }
  void run_pack_ternary(const Tensor& q, int64_t rows, int64_t cols, Tensor& packed) override {
    check(Op::pack_ternary, [&](int64_t* bad) { return hybrit_c_pack_ternary(q.data<int8_t>(), rows, cols, packed.data<uint8_t>(), bad); });
  }
  void run_unpack_ternary(const Tensor& packed, int64_t rows, int64_t cols, Tensor& q) override {
    check(Op::unpack_ternary, [&](int64_t* bad) { return hybrit_c_unpack_ternary(packed.data<uint8_t>(), rows, cols, q.data<int8_t>(), bad); });
  }
  void run_matmul(const Tensor& a, const Tensor& b, Tensor& c, int64_t m, int64_t n, int64_t k, const MatmulArgs& args) override {
    check(Op::matmul, [&](int64_t*) {
      return hybrit_c_sgemm(kr_, args.trans_a, args.trans_b, m, n, k, args.alpha, a.data<float>(), a.dim(1), b.data<float>(), b.dim(1),
                            args.beta, c.data<float>(), n);
    });
  }
  void run_kmeans_assign(const Tensor& x, const Tensor& centroids, Tensor& labels, Tensor& dist) override {
    check(Op::kmeans_assign, [&](int64_t* bad) {
      return hybrit_c_kmeans_assign(kr_, x.data<float>(), x.dim(0), x.dim(1), centroids.data<float>(), centroids.dim(0),
                                    labels.data<int32_t>(), dist.data<float>(), bad);
    });
  }
  void run_kmeans_update(const Tensor& x, const Tensor& labels, Tensor& sums, Tensor& counts) override {
    check(Op::kmeans_update, [&](int64_t* bad) {
      return hybrit_c_kmeans_update(x.data<float>(), x.dim(0), x.dim(1), labels.data<int32_t>(), sums.dim(0), sums.data<double>(),
                                    counts.data<int64_t>(), bad);
    });
  }
  void run_matmul_ternary(const Tensor& xq, const Tensor& x_scales, const Tensor& w_packed, float w_scale, Tensor& y, int64_t m, int64_t n,
                          int64_t k) override {
    check(Op::matmul_ternary, [&](int64_t*) {
      return hybrit_c_matmul_ternary(kr_, xq.data<int8_t>(), x_scales.data<float>(), m, k, w_packed.data<uint8_t>(), n, w_scale, y.data<float>());
    });
  }

  void run_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionShape& sh, Tensor& out, Tensor& lse) override {
    const hybrit_attention_shape s = c_attention_shape(sh);
    check(Op::attention_forward, [&](int64_t*) {
      return hybrit_c_attention_forward_all(kr_, &s, q.data<float>(), k.data<float>(), v.data<float>(), out.data<float>(), lse.data<float>());
    });
  }
  void run_attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& dout, const Tensor& lse,
                              const AttentionShape& sh, Tensor& dq, Tensor& dk, Tensor& dv) override {
    const hybrit_attention_shape s = c_attention_shape(sh);
    check(Op::attention_backward, [&](int64_t*) {
      return hybrit_c_attention_backward_all(kr_, &s, q.data<float>(), k.data<float>(), v.data<float>(), out.data<float>(), dout.data<float>(),
                                             lse.data<float>(), dq.data<float>(), dk.data<float>(), dv.data<float>());
    });
  }

 private:
  SimdLevel level_;
  const hybrit_c_kernels* kr_;
};

}  // namespace

std::unique_ptr<Backend> make_c_backend(SimdLevel level) {
  const SimdLevel best = cpu_hardware().best_simd();
  if (static_cast<int>(level) > static_cast<int>(best))
    fail(ErrorKind::unsupported, "SIMD level ", to_string(level), " requested but this CPU supports at most ", to_string(best));
  return std::make_unique<CBackend>(level);
}

}  // namespace hybrit
