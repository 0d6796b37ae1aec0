#include "backends/backend.hpp"
#include "core/names.hpp"

#include <algorithm>
#include <cmath>

#include "backends/c/hybrit_c.h"

namespace hybrit {

static const char* const kBackendNames[] = {"c", "tbb", "cuda"};  // in enum order
static_assert(sizeof(kBackendNames) / sizeof(kBackendNames[0]) == kBackendCount, "one name per backend");

const char* to_string(BackendKind kind) { return kBackendNames[int(kind)]; }

BackendKind parse_backend(const std::string& text, const std::string& what) { return parse_name<BackendKind>(kBackendNames, text, what); }

static const char* kOpNames[] = {"quantize_ternary", "quantize_int8_rows", "pack_ternary", "unpack_ternary",      "matmul",
                                 "kmeans_assign",    "kmeans_update",      "matmul_ternary", "attention_forward", "attention_backward"};
static_assert(sizeof(kOpNames) / sizeof(kOpNames[0]) == kOpCount, "one name per op");

const char* to_string(Op op) { return kOpNames[static_cast<int>(op)]; }

Op parse_op(const std::string& text, const std::string& what) {
  for (int i = 0; i < kOpCount; ++i)
    if (text == kOpNames[i]) return static_cast<Op>(i);
  std::string all;
  for (const char* name : kOpNames) all += std::string(all.empty() ? "" : ", ") + name;
  fail(ErrorKind::invalid_argument, what, ": unknown op '", text, "' (expected one of ", all, ")");
}

std::pair<int64_t, int64_t> as_matrix(const Tensor& t) {
  if (t.ndim() == 0) return {1, 1};
  int64_t rows = 1;
  for (int i = 0; i + 1 < t.ndim(); ++i) rows *= t.shape()[i];
  return {rows, t.shape().back()};
}

void raise_kernel_status(int status, Op op, int64_t bad_index, const float* values) {
  switch (status) {
    case HYBRIT_C_OK: return;
    case HYBRIT_C_NOMEM: fail(ErrorKind::out_of_memory, to_string(op), ": out of memory for scratch buffers");
    case HYBRIT_C_NONFINITE: {
      if (op == Op::quantize_int8_rows) fail(ErrorKind::invalid_argument, to_string(op), ": row ", bad_index, " contains NaN or Inf");
      if (op == Op::kmeans_assign && bad_index < 0)
        fail(ErrorKind::invalid_argument, to_string(op), ": centroid ", -1 - bad_index, " contains NaN or Inf, or its squared norm overflows float");
      if (op == Op::kmeans_assign || op == Op::kmeans_update)
        fail(ErrorKind::invalid_argument, to_string(op), ": point ", bad_index, " contains NaN or Inf, or its squared norm overflows float");
      const char* what = values && bad_index >= 0 ? (std::isnan(values[bad_index]) ? "NaN" : "Inf") : "NaN or Inf";
      fail(ErrorKind::invalid_argument, to_string(op), ": input element ", bad_index, " is ", what);
    }
    case HYBRIT_C_BADVALUE:
      if (op == Op::pack_ternary) fail(ErrorKind::invalid_argument, to_string(op), ": element ", bad_index, " is not -1, 0 or +1");
      if (op == Op::unpack_ternary) fail(ErrorKind::corrupt_data, to_string(op), ": weight ", bad_index, " has the invalid code 0b11");
      fail(ErrorKind::invalid_argument, to_string(op), ": label of point ", bad_index, " is outside [0, k)");
    default: fail(ErrorKind::invalid_argument, to_string(op), ": kernel failed with status ", status);
  }
}

void Backend::check_device(const Tensor& t, const char* op, const char* name) const {
  if (computes_on_host() && !t.device().is_cpu())
    fail(ErrorKind::invalid_argument, op, ": ", name, " is on ", t.device().str(), " but the ", to_string(kind()),
         " backend computes on the host; copy it with .to(cpu)");
}

namespace {
// The message is only built when the check fails: these checks run on every op call.
template <class... Parts>
void expect(bool ok, const char* op, const Parts&... message) {
  if (!ok) fail(ErrorKind::invalid_argument, op, ": ", message...);
}
struct desc {  // "f32 (3, 4)", written only into a failure's message
  explicit desc(const Tensor& tensor) : t(tensor) {}  // (clang 14 has no parenthesized aggregate init)
  const Tensor& t;
};
std::ostream& operator<<(std::ostream& out, const desc& d) { return out << dtype_name(d.t.dtype()) << " " << shape_str(d.t.shape()); }
struct shape_of {
  explicit shape_of(const Shape& s) : shape(s) {}
  const Shape& shape;
};
std::ostream& operator<<(std::ostream& out, const shape_of& s) { return out << shape_str(s.shape); }
}  // namespace

float Backend::quantize_ternary(const Tensor& w, Tensor& q) {
  const char* op = "quantize_ternary";
  expect(w.dtype() == DType::f32, op, "weights must be f32, got ", desc(w));
  expect(q.dtype() == DType::i8 && q.numel() == w.numel(), op, "output must be i8 with ", w.numel(), " elements, got ", desc(q));
  check_device(w, op, "weights");
  check_device(q, op, "output");
  return run_quantize_ternary(w, q);
}

void Backend::quantize_int8_rows(const Tensor& x, Tensor& q, Tensor& scales) {
  const char* op = "quantize_int8_rows";
  expect(x.dtype() == DType::f32 && x.ndim() >= 1, op, "input must be f32 with at least one axis, got ", desc(x));
  const auto [rows, cols] = as_matrix(x);
  expect(q.dtype() == DType::i8 && q.numel() == x.numel(), op, "output must be i8 with ", x.numel(), " elements, got ", desc(q));
  expect(scales.dtype() == DType::f32 && scales.numel() == rows, op, "scales must be f32 with ", rows, " elements, got ", desc(scales));
  check_device(x, op, "input");
  check_device(q, op, "output");
  check_device(scales, op, "scales");
  run_quantize_int8_rows(x, rows, cols, q, scales);
}

void Backend::pack_ternary(const Tensor& q, Tensor& packed) {
  const char* op = "pack_ternary";
  expect(q.dtype() == DType::i8 && q.ndim() >= 1, op, "input must be i8 with at least one axis, got ", desc(q));
  const auto [rows, cols] = as_matrix(q);
  expect((packed.dtype() == DType::ternary2 || packed.dtype() == DType::u8) && packed.numel() == rows * hybrit_packed_cols(cols), op,
         "output must be ternary2 with ", rows, " x ", hybrit_packed_cols(cols), " bytes, got ", desc(packed));
  check_device(q, op, "input");
  check_device(packed, op, "output");
  run_pack_ternary(q, rows, cols, packed);
}

void Backend::unpack_ternary(const Tensor& packed, Tensor& q) {
  const char* op = "unpack_ternary";
  expect(q.dtype() == DType::i8 && q.ndim() >= 1, op, "output must be i8 with at least one axis, got ", desc(q));
  const auto [rows, cols] = as_matrix(q);
  expect((packed.dtype() == DType::ternary2 || packed.dtype() == DType::u8) && packed.numel() == rows * hybrit_packed_cols(cols), op,
         "packed input must hold ", rows, " x ", hybrit_packed_cols(cols), " bytes for an output of shape ", shape_of{q.shape()}, ", got ", desc(packed));
  check_device(packed, op, "input");
  check_device(q, op, "output");
  run_unpack_ternary(packed, rows, cols, q);
}

void Backend::matmul(const Tensor& a, const Tensor& b, Tensor& c, const MatmulArgs& args) {
  const char* op = "matmul";
  expect(a.dtype() == DType::f32 && a.ndim() == 2, op, "a must be a 2-D f32 matrix, got ", desc(a));
  expect(b.dtype() == DType::f32 && b.ndim() == 2, op, "b must be a 2-D f32 matrix, got ", desc(b));
  const int64_t m = args.trans_a ? a.dim(1) : a.dim(0), k = args.trans_a ? a.dim(0) : a.dim(1);
  const int64_t kb = args.trans_b ? b.dim(1) : b.dim(0), n = args.trans_b ? b.dim(0) : b.dim(1);
  expect(k == kb, op, "inner dimensions differ: op(a) is ", m, " x ", k, ", op(b) is ", kb, " x ", n);
  expect(c.dtype() == DType::f32 && c.ndim() == 2 && c.dim(0) == m && c.dim(1) == n, op,
         "c must be f32 (", m, ", ", n, "), got ", desc(c));
  check_device(a, op, "a");
  check_device(b, op, "b");
  check_device(c, op, "c");
  run_matmul(a, b, c, m, n, k, args);
}

void Backend::kmeans_assign(const Tensor& x, const Tensor& centroids, Tensor& labels, Tensor& dist) {
  const char* op = "kmeans_assign";
  expect(x.dtype() == DType::f32 && x.ndim() == 2, op, "points must be a 2-D f32 matrix, got ", desc(x));
  expect(centroids.dtype() == DType::f32 && centroids.ndim() == 2, op, "centroids must be a 2-D f32 matrix, got ", desc(centroids));
  expect(centroids.dim(1) == x.dim(1), op, "points have ", x.dim(1), " dimensions but centroids have ", centroids.dim(1));
  expect(x.dim(0) == 0 || (centroids.dim(0) > 0 && x.dim(1) > 0), op,
         "need at least one centroid and one dimension, got k = ", centroids.dim(0), ", d = ", x.dim(1));
  expect(centroids.dim(0) <= INT32_MAX, op, "more than 2^31 - 1 centroids");
  expect(labels.dtype() == DType::i32 && labels.numel() == x.dim(0), op, "labels must be i32 with ", x.dim(0), " elements, got ", desc(labels));
  expect(dist.dtype() == DType::f32 && dist.numel() == x.dim(0), op, "distances must be f32 with ", x.dim(0), " elements, got ", desc(dist));
  check_device(x, op, "points");
  check_device(centroids, op, "centroids");
  check_device(labels, op, "labels");
  check_device(dist, op, "distances");
  run_kmeans_assign(x, centroids, labels, dist);
}

void Backend::kmeans_update(const Tensor& x, const Tensor& labels, Tensor& sums, Tensor& counts) {
  const char* op = "kmeans_update";
  expect(x.dtype() == DType::f32 && x.ndim() == 2, op, "points must be a 2-D f32 matrix, got ", desc(x));
  expect(labels.dtype() == DType::i32 && labels.numel() == x.dim(0), op, "labels must be i32 with ", x.dim(0), " elements, got ", desc(labels));
  expect(sums.dtype() == DType::f64 && sums.ndim() == 2 && sums.dim(1) == x.dim(1), op, "sums must be f64 (k, ", x.dim(1), "), got ", desc(sums));
  expect(counts.dtype() == DType::i64 && counts.numel() == sums.dim(0), op, "counts must be i64 with ", sums.dim(0), " elements, got ", desc(counts));
  check_device(x, op, "points");
  check_device(labels, op, "labels");
  check_device(sums, op, "sums");
  check_device(counts, op, "counts");
  run_kmeans_update(x, labels, sums, counts);
}

const HardwareInfo& hardware() {
  static const HardwareInfo hw = [] {
    HardwareInfo h = cpu_hardware();
    probe_cuda(h);
    return h;
  }();
  return hw;
}

void Backend::matmul_ternary(const Tensor& xq, const Tensor& x_scales, const Tensor& w_packed, float w_scale, Tensor& y) {
  const char* op = "matmul_ternary";
  expect(xq.dtype() == DType::i8 && xq.ndim() == 2, op, "activations must be a 2-D i8 matrix, got ", desc(xq));
  const int64_t m = xq.dim(0), k = xq.dim(1);
  expect(x_scales.dtype() == DType::f32 && x_scales.numel() == m, op, "activation scales must be f32 with ", m, " elements, got ", desc(x_scales));
  expect((w_packed.dtype() == DType::ternary2 || w_packed.dtype() == DType::u8) && w_packed.ndim() == 2 && w_packed.dim(1) == hybrit_packed_cols(k), op,
         "packed weights must be ternary2 (n, ", hybrit_packed_cols(k), ") for k = ", k, ", got ", desc(w_packed));
  const int64_t n = w_packed.dim(0);
  expect(y.dtype() == DType::f32 && y.ndim() == 2 && y.dim(0) == m && y.dim(1) == n, op, "output must be f32 (", m, ", ", n, "), got ", desc(y));
  expect(std::isfinite(w_scale) && w_scale > 0, op, "the weight scale must be positive and finite, got ", w_scale);
  check_device(xq, op, "activations");
  check_device(x_scales, op, "activation scales");
  check_device(w_packed, op, "packed weights");
  check_device(y, op, "output");
  run_matmul_ternary(xq, x_scales, w_packed, w_scale, y, m, n, k);
}

// The checks both attention ops share: a valid shape, every query-side tensor (q, out, dout, dq)
// (batch * seq, heads * head_dim) f32, every kv-side one (batch * seq, kv_heads * head_dim), lse
// (batch * heads * seq values), all where this backend computes. (A backend without a kernel
// keeps the default run_* hooks below, which say so.)
void Backend::check_attention(Op op_kind, const AttentionShape& sh, std::initializer_list<std::pair<const Tensor*, const char*>> query_side,
                              std::initializer_list<std::pair<const Tensor*, const char*>> kv_side, const Tensor& lse) const {
  const char* op = to_string(op_kind);
  expect(sh.batch > 0 && sh.seq > 0 && sh.heads > 0 && sh.kv_heads > 0 && sh.head_dim > 0 && sh.heads % sh.kv_heads == 0, op,
         "shape must be positive with heads (", sh.heads, ") a multiple of kv_heads (", sh.kv_heads, "), got batch ", sh.batch, ", seq ", sh.seq,
         ", head_dim ", sh.head_dim);
  const int64_t rows = sh.batch * sh.seq;
  auto matrix_of = [&](const Tensor& t, int64_t cols, const char* name) {
    expect(t.dtype() == DType::f32 && t.ndim() == 2 && t.dim(0) == rows && t.dim(1) == cols, op, name, " must be f32 (", rows, ", ", cols, "), got ", desc(t));
    check_device(t, op, name);
  };
  for (auto [t, name] : query_side) matrix_of(*t, sh.heads * sh.head_dim, name);
  for (auto [t, name] : kv_side) matrix_of(*t, sh.kv_heads * sh.head_dim, name);
  expect(lse.dtype() == DType::f32 && lse.numel() == sh.batch * sh.heads * sh.seq, op, "lse must be f32 with ", sh.batch * sh.heads * sh.seq,
         " elements, got ", desc(lse));
  check_device(lse, op, "lse");
}

void Backend::attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionShape& sh, Tensor& out, Tensor& lse) {
  check_attention(Op::attention_forward, sh, {{&q, "q"}, {&out, "out"}}, {{&k, "k"}, {&v, "v"}}, lse);
  run_attention_forward(q, k, v, sh, out, lse);
}

void Backend::attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& dout, const Tensor& lse,
                                 const AttentionShape& sh, Tensor& dq, Tensor& dk, Tensor& dv) {
  check_attention(Op::attention_backward, sh, {{&q, "q"}, {&out, "out"}, {&dout, "dout"}, {&dq, "dq"}}, {{&k, "k"}, {&v, "v"}, {&dk, "dk"}, {&dv, "dv"}},
                  lse);
  run_attention_backward(q, k, v, out, dout, lse, sh, dq, dk, dv);
}

void Backend::run_attention_forward(const Tensor&, const Tensor&, const Tensor&, const AttentionShape&, Tensor&, Tensor&) {
  fail(ErrorKind::unsupported, "attention_forward: the ", to_string(kind()), " backend has no kernel for this op");
}
void Backend::run_attention_backward(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const AttentionShape&,
                                     Tensor&, Tensor&, Tensor&) {
  fail(ErrorKind::unsupported, "attention_backward: the ", to_string(kind()), " backend has no kernel for this op");
}

void Backend::parallel_for(int64_t n, int64_t grain, const RangeBody& body) {
  grain = std::max<int64_t>(grain, 1);
  for (int64_t i = 0; i < n; i += grain) body(i, std::min(n, i + grain));
}

}  // namespace hybrit
