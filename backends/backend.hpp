// The op table: one interface, three implementations (c, tbb, cuda). No policy lives here; the
// dispatcher decides which backend runs what. Public methods validate shapes, dtypes and devices
// once for every backend and then call the backend's run_* hook.
#pragma once
#include <functional>
#include <initializer_list>
#include <utility>
#include <memory>
#include <string>

#include "core/hardware.hpp"
#include "core/tensor.hpp"

namespace hybrit {

enum class BackendKind { c = 0, tbb = 1, cuda = 2 };
inline constexpr int kBackendCount = 3;
const char* to_string(BackendKind kind);
// "c" | "tbb" | "cuda"; Error(invalid_argument) naming `what` otherwise.
BackendKind parse_backend(const std::string& text, const std::string& what);

enum class Op {
  quantize_ternary = 0,
  quantize_int8_rows,
  pack_ternary,
  unpack_ternary,
  matmul,
  kmeans_assign,
  kmeans_update,
  matmul_ternary,
  attention_forward,
  attention_backward
};
inline constexpr int kOpCount = 10;
const char* to_string(Op op);
Op parse_op(const std::string& text, const std::string& what);

struct MatmulArgs {
  bool trans_a = false, trans_b = false;
  float alpha = 1.0f, beta = 0.0f;
};

// Causal grouped-query attention over `batch` sequences of `seq` tokens: q and out are
// (batch * seq, heads * head_dim), k and v (batch * seq, kv_heads * head_dim), query head h reads
// kv head h / (heads / kv_heads); scores are scale * q . k, key s visible to query t when s <= t.
// (The C kernels' hybrit_attention_shape has the same fields; c_attention_shape converts.)
struct AttentionShape {
  int64_t batch = 1, seq = 1, heads = 1, kv_heads = 1, head_dim = 1;
  float scale = 1.0f;
};

// body(begin, end) over fixed pieces of [0, n): piece p is [p * grain, min(n, (p + 1) * grain)).
using RangeBody = std::function<void(int64_t, int64_t)>;

class Backend {
 public:
  virtual ~Backend() = default;
  virtual BackendKind kind() const = 0;
  // One line for reports, e.g. "c (avx512)" or "tbb (2 threads, Eigen avx512)".
  virtual std::string describe() const = 0;
  // CPU backends read and write host memory only; the CUDA backend takes either.
  virtual bool computes_on_host() const = 0;

  // Returns the scale s; q (int8, same shape as w) holds clamp(rint(w / s), -1, 1).
  float quantize_ternary(const Tensor& w, Tensor& q);
  // x (rows, cols) f32 -> q (rows, cols) i8 and scales (rows,) f32, s = 127 / max(absmax, 1e-5).
  void quantize_int8_rows(const Tensor& x, Tensor& q, Tensor& scales);
  // q (rows, cols) i8 in {-1, 0, 1} -> packed (rows, ceil(cols / 4)) ternary2.
  void pack_ternary(const Tensor& q, Tensor& packed);
  void unpack_ternary(const Tensor& packed, Tensor& q);
  // c = alpha * op(a) * op(b) + beta * c, all 2-D f32.
  void matmul(const Tensor& a, const Tensor& b, Tensor& c, const MatmulArgs& args);
  // x (n, d), centroids (k, d) -> labels (n,) i32 and squared distances (n,) f32.
  void kmeans_assign(const Tensor& x, const Tensor& centroids, Tensor& labels, Tensor& dist);
  // x (n, d), labels (n,) i32 -> sums (k, d) f64 and counts (k,) i64.
  void kmeans_update(const Tensor& x, const Tensor& labels, Tensor& sums, Tensor& counts);
  // The BitLinear product at inference: xq (m, k) i8 with per-row scales (m,) f32 (x ~ xq / scale,
  // as quantize_int8_rows makes them), w (n, ceil(k / 4)) ternary2 (pack_ternary's layout) with
  // its scale -> y (m, n) f32 = (xq . q_w^T) * w_scale / x_scale, the dot products exact in integers.
  void matmul_ternary(const Tensor& xq, const Tensor& x_scales, const Tensor& w_packed, float w_scale, Tensor& y);
  // Tiled with an online softmax: out, and lse (batch, heads, seq) f32 = the log-sum-exp of each
  // query row's scores, which is all the backward needs (no seq x seq matrix is stored).
  void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionShape& shape, Tensor& out, Tensor& lse);
  // Gradients of sum(out * dout) with respect to q, k and v (overwritten), recomputing each tile's
  // probabilities from lse.
  void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& dout, const Tensor& lse,
                          const AttentionShape& shape, Tensor& dq, Tensor& dk, Tensor& dv);
  // Whether this backend has a kernel for `op` (the CUDA backend has none for attention yet).
  virtual bool supports(Op op) const {
    (void)op;
    return true;
  }
  // The loops of the model that are not ops of their own (norms, RoPE, activations, residuals,
  // the loss) run through here: the c backend runs the pieces in order on the calling thread, the
  // tbb backend spreads them over its arena. Pieces are fixed by n and grain, so a body that
  // writes only its own piece gives the same bits on any thread count.
  virtual void parallel_for(int64_t n, int64_t grain, const RangeBody& body);
  virtual int threads() const { return 1; }

 protected:
  virtual float run_quantize_ternary(const Tensor& w, Tensor& q) = 0;
  virtual void run_quantize_int8_rows(const Tensor& x, int64_t rows, int64_t cols, Tensor& q, Tensor& scales) = 0;
  virtual void run_pack_ternary(const Tensor& q, int64_t rows, int64_t cols, Tensor& packed) = 0;
  virtual void run_unpack_ternary(const Tensor& packed, int64_t rows, int64_t cols, Tensor& q) = 0;
  virtual void run_matmul(const Tensor& a, const Tensor& b, Tensor& c, int64_t m, int64_t n, int64_t k, const MatmulArgs& args) = 0;
  virtual void run_kmeans_assign(const Tensor& x, const Tensor& centroids, Tensor& labels, Tensor& dist) = 0;
  virtual void run_kmeans_update(const Tensor& x, const Tensor& labels, Tensor& sums, Tensor& counts) = 0;
  virtual void run_matmul_ternary(const Tensor& xq, const Tensor& x_scales, const Tensor& w_packed, float w_scale, Tensor& y, int64_t m, int64_t n,
                                  int64_t k) = 0;
  virtual void run_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionShape& shape, Tensor& out, Tensor& lse);
  virtual void run_attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& dout,
                                      const Tensor& lse, const AttentionShape& shape, Tensor& dq, Tensor& dk, Tensor& dv);

 private:
  void check_device(const Tensor& t, const char* op, const char* name) const;
  void check_attention(Op op, const AttentionShape& shape, std::initializer_list<std::pair<const Tensor*, const char*>> query_side,
                       std::initializer_list<std::pair<const Tensor*, const char*>> kv_side, const Tensor& lse) const;
};

// Rows and columns of a tensor seen as a matrix: a 1-D tensor is one row, an n-D tensor is
// (product of leading extents, last extent).
std::pair<int64_t, int64_t> as_matrix(const Tensor& t);

// Turns a plain-C status code into the Error every backend raises for it.
// `values` is the host copy of the input when the code names an element of it.
void raise_kernel_status(int status, Op op, int64_t bad_index, const float* values = nullptr);

std::unique_ptr<Backend> make_c_backend(SimdLevel level);
// threads <= 0: the CPUs this process was granted.
std::unique_ptr<Backend> make_tbb_backend(SimdLevel level, int threads = 0);
// nullptr when no CUDA device can be used; *why_not says why (not built, no device, driver error).
std::unique_ptr<Backend> make_cuda_backend(std::string* why_not);
// Fills hw.cuda_devices and hw.cuda_status (no-op text when the CUDA backend is not built).
void probe_cuda(HardwareInfo& hw);
bool cuda_backend_built();

// The full probe: CPU (core) plus CUDA devices. Cached.
const HardwareInfo& hardware();

}  // namespace hybrit
