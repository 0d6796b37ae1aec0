// The CUDA backend: kernels plus cuBLAS, on host or device tensors. Host inputs are uploaded and
// host outputs downloaded around each op (the dispatcher charges that transfer); device tensors
// are used in place. Memory is plain cudaMalloc, never managed memory.
// Bit-for-bit contract with the C backend (backends/README.md): the ternary |w| sum follows the
// canonical chunk/lane order, thresholds and scales are computed on the host with the C code, and
// rounding is rintf (half to even).
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <mutex>
#include <vector>

#include "backends/backend.hpp"
#include "backends/c/hybrit_c.h"

namespace hybrit {
namespace {

void check_cuda(cudaError_t status, const char* what) {
  if (status == cudaSuccess) return;
  fail(status == cudaErrorMemoryAllocation ? ErrorKind::out_of_memory : ErrorKind::unsupported, "CUDA: ", what, ": ",
       cudaGetErrorString(status));
}
void check_cublas(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS) fail(ErrorKind::unsupported, "cuBLAS: ", what, " failed with status ", int(status));
}
#define CUDA_CHECK(expr) check_cuda((expr), #expr)
#define CUBLAS_CHECK(expr) check_cublas((expr), #expr)

void* cuda_allocate(size_t bytes, int device) {
  CUDA_CHECK(cudaSetDevice(device));
  void* p = nullptr;
  const cudaError_t status = cudaMalloc(&p, bytes);
  if (status != cudaSuccess)
    fail(ErrorKind::out_of_memory, "cannot allocate ", format_bytes(double(bytes)), " on cuda:", device, ": ", cudaGetErrorString(status));
  return p;
}
void cuda_release(void* p, int device) {
  cudaSetDevice(device);
  cudaFree(p);  // never throws from a deleter
}
void cuda_copy(void* dst, Device, const void* src, Device, size_t bytes) {
  CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault));
}

constexpr int kThreads = 256;
unsigned blocks_for(int64_t n, int threads = kThreads) {
  return unsigned(std::clamp<int64_t>((n + threads - 1) / threads, 1, 65535 * 16));
}

// ---------------------------------------------------------------- kernels

// One 16-lane group per chunk, lane j summing elements j, j+16, ... in order, then the same
// halving fold as the C code (a + b == b + a exactly, so the shuffle direction does not matter).
__global__ void chunk_abs_sums_kernel(const float* x, int64_t n, double* out, int64_t chunks) {
  const int64_t chunk = int64_t(blockIdx.x) * (blockDim.x / HYBRIT_SUM_LANES) + threadIdx.x / HYBRIT_SUM_LANES;
  const int lane = threadIdx.x % HYBRIT_SUM_LANES;
  double acc = 0.0;
  if (chunk < chunks) {
    const int64_t c0 = chunk * HYBRIT_SUM_CHUNK, len = min(int64_t(HYBRIT_SUM_CHUNK), n - c0);
    for (int64_t i = lane; i < len; i += HYBRIT_SUM_LANES) acc += fabs(double(x[c0 + i]));
  }
  for (int h = HYBRIT_SUM_LANES / 2; h >= 1; h /= 2) {
    const double other = __shfl_down_sync(0xffffffffu, acc, h, HYBRIT_SUM_LANES);
    if (lane < h) acc += other;
  }
  if (chunk < chunks && lane == 0) out[chunk] = acc;
}

// hybrit_c_fold_sums on the GPU: the same pairs, level by level, in one block.
__global__ void fold_sums_kernel(double* a, int64_t m) {
  for (int64_t s = 1; s < m; s *= 2) {
    for (int64_t i = 2 * s * threadIdx.x; i + s < m; i += 2 * s * blockDim.x) a[i] += a[i + s];
    __syncthreads();
  }
}

__global__ void ternary_kernel(const float* w, int64_t n, float t, int8_t* q) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    q[i] = int8_t((w[i] >= t) - (w[i] <= -t));
}

__global__ void int8_rows_kernel(const float* x, int64_t cols, int8_t* q, float* scales, unsigned long long* bad_row) {
  const int64_t row = blockIdx.x;
  const float* xr = x + row * cols;
  float m = 0.0f;
  int ok = 1;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const float a = fabsf(xr[j]);
    ok &= a <= FLT_MAX;
    m = fmaxf(m, a);
  }
  __shared__ float max_part[kThreads];
  __shared__ int ok_part[kThreads];
  max_part[threadIdx.x] = m;
  ok_part[threadIdx.x] = ok;
  __syncthreads();
  for (int h = blockDim.x / 2; h >= 1; h /= 2) {
    if (threadIdx.x < h) {
      max_part[threadIdx.x] = fmaxf(max_part[threadIdx.x], max_part[threadIdx.x + h]);
      ok_part[threadIdx.x] &= ok_part[threadIdx.x + h];
    }
    __syncthreads();
  }
  if (!ok_part[0]) {
    if (threadIdx.x == 0) atomicMin(bad_row, (unsigned long long)row);
    return;
  }
  const float amax = max_part[0];
  const float s = __fdiv_rn(127.0f, amax > 1e-5f ? amax : 1e-5f);
  if (threadIdx.x == 0) scales[row] = s;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const float r = rintf(__fmul_rn(xr[j], s));
    q[row * cols + j] = int8_t(r > 127.0f ? 127 : (r < -128.0f ? -128 : int(r)));
  }
}

__global__ void pack_kernel(const int8_t* q, int64_t rows, int64_t cols, uint8_t* packed, unsigned long long* bad) {
  const int64_t pc = (cols + 3) / 4;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < rows * pc; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = idx / pc, b = idx % pc;
    unsigned byte = 0x55u;  // padding slots hold the code of 0
    for (int64_t j = 4 * b; j < min(4 * b + 4, cols); ++j) {
      const int8_t v = q[r * cols + j];
      if (v < -1 || v > 1) atomicMin(bad, (unsigned long long)(r * cols + j));
      byte = (byte & ~(3u << (2 * (j & 3)))) | (unsigned((v + 1) & 3) << (2 * (j & 3)));
    }
    packed[idx] = uint8_t(byte);
  }
}

__global__ void unpack_kernel(const uint8_t* packed, int64_t rows, int64_t cols, int8_t* q, unsigned long long* bad) {
  const int64_t pc = (cols + 3) / 4;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < rows * cols; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = idx / cols, j = idx % cols;
    const unsigned code = (packed[r * pc + j / 4] >> (2 * (j & 3))) & 3u;
    if (code == 3u) atomicMin(bad, (unsigned long long)idx);
    q[idx] = int8_t(int(code) - 1);
  }
}

// Squared row norms, accumulated in double and rounded once, like the C backend.
__global__ void row_norms_kernel(const float* x, int64_t n, int64_t d, float* out, unsigned long long* bad) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    double s = 0.0;
    for (int64_t j = 0; j < d; ++j) s += double(x[i * d + j]) * double(x[i * d + j]);
    out[i] = float(s);
    if (!(out[i] <= FLT_MAX)) atomicMin(bad, (unsigned long long)i);
  }
}

// One warp per point of the tile, striding over the points (a tile can hold more points than
// one grid has warps): the nearest centroid of this tile, merged into the running best (earlier
// tiles hold lower indices, so a tie keeps the earlier one). The loop bound is the same for all
// lanes of a warp, so the shuffles always see a full warp.
__global__ void argmin_tile_kernel(const float* dots, int64_t points, int64_t tile_k, int64_t c0, const float* xn, const float* cn,
                                   float* best_dist, int32_t* best_label) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = int64_t(gridDim.x) * blockDim.x / 32;
  for (int64_t i = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32; i < points; i += warps) {
    float best = INFINITY;
    int64_t arg = INT64_MAX;
    for (int64_t j = lane; j < tile_k; j += 32) {
      const float dd = __fsub_rn(__fadd_rn(xn[i], cn[c0 + j]), __fmul_rn(2.0f, dots[i * tile_k + j]));
      if (dd < best) { best = dd; arg = c0 + j; }
    }
    for (int off = 16; off >= 1; off /= 2) {
      const float ob = __shfl_down_sync(0xffffffffu, best, off);
      const int64_t oa = __shfl_down_sync(0xffffffffu, arg, off);
      if (ob < best || (ob == best && oa < arg)) { best = ob; arg = oa; }
    }
    if (lane == 0 && best < best_dist[i]) {
      best_dist[i] = best;
      best_label[i] = int32_t(arg);
    }
  }
}

__global__ void init_best_kernel(int64_t n, float* dist, int32_t* labels) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    dist[i] = INFINITY;
    labels[i] = 0;
  }
}

__global__ void clamp_zero_kernel(int64_t n, float* dist) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dist[i] = fmaxf(dist[i], 0.0f);
}

__global__ void update_kernel(const float* x, int64_t n, int64_t d, const int32_t* labels, int64_t k, double* sums,
                              unsigned long long* counts, unsigned long long* bad) {
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n * d; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = idx / d, j = idx % d;
    const int32_t l = labels[i];
    if (l < 0 || l >= k) {
      if (j == 0) atomicMin(bad, (unsigned long long)i);
      continue;
    }
    atomicAdd(&sums[int64_t(l) * d + j], double(x[idx]));
    if (j == 0) atomicAdd(&counts[l], 1ull);
  }
}

// One block per (output column r, activation row i): threads stride over the packed bytes of
// weight row r, the int dot product is summed in the block (exact), then scaled as the CPU does.
// Block (r, y) computes output column r for rows y, y + gridDim.y, ...: gridDim.y is at most
// 65,535 (CUDA's limit), so any number of activation rows runs.
__global__ void matmul_ternary_kernel(const int8_t* xq, const float* x_scales, int64_t m, int64_t k, const uint8_t* w, float w_scale, int64_t n,
                                      float* y) {
  const int64_t r = blockIdx.x, nbytes = (k + 3) / 4;
  const uint8_t* wr = w + r * nbytes;
  __shared__ long long partial[kThreads];
  for (int64_t i = blockIdx.y; i < m; i += gridDim.y) {
    const int8_t* xi = xq + i * k;
    long long acc = 0;
    for (int64_t b = threadIdx.x; b < nbytes; b += blockDim.x) {
      const unsigned c = wr[b];
      for (int t = 0; t < 4; ++t) {
        const int64_t j = 4 * b + t;
        if (j < k) acc += (long long)(int((c >> (2 * t)) & 3u) - 1) * xi[j];
      }
    }
    partial[threadIdx.x] = acc;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s /= 2) {
      if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
      __syncthreads();
    }
    if (threadIdx.x == 0) y[i * n + r] = float(double(partial[0]) * (double(w_scale) / double(x_scales[i])));  // as the C kernels round
    __syncthreads();  // partial[0] is read before the next row overwrites it
  }
}

__global__ void finite_kernel(const double* v, int64_t n, unsigned long long* bad) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    if (!isfinite(v[i])) atomicMin(bad, (unsigned long long)i);
}

// ---------------------------------------------------------------- host side

// A device flag holding the smallest offending index (ULLONG_MAX: none).
class BadIndex {
 public:
  explicit BadIndex(int device) : t_(Tensor::empty({1}, DType::i64, Device::cuda(device))) {
    const unsigned long long none = ULLONG_MAX;
    CUDA_CHECK(cudaMemcpy(t_.raw(), &none, sizeof none, cudaMemcpyHostToDevice));
  }
  unsigned long long* ptr() { return static_cast<unsigned long long*>(t_.raw()); }
  // -1 when nothing was flagged.
  int64_t get() const {
    unsigned long long v = 0;
    CUDA_CHECK(cudaMemcpy(&v, t_.raw(), sizeof v, cudaMemcpyDeviceToHost));
    return v == ULLONG_MAX ? -1 : int64_t(v);
  }

 private:
  Tensor t_;
};

class CudaBackend final : public Backend {
 public:
  CudaBackend(int device, std::string name) : device_(device), name_(std::move(name)) {
    CUDA_CHECK(cudaSetDevice(device_));
    CUBLAS_CHECK(cublasCreate(&cublas_));
    // Plain FP32: no TF32 behind the caller's back; the tests compare against the C reference.
    CUBLAS_CHECK(cublasSetMathMode(cublas_, CUBLAS_PEDANTIC_MATH));
  }
  ~CudaBackend() override { cublasDestroy(cublas_); }
  // No attention kernels yet: the dispatcher runs attention on a CPU backend (forcing cuda for it is an error).
  bool supports(Op op) const override { return op != Op::attention_forward && op != Op::attention_backward; }
  BackendKind kind() const override { return BackendKind::cuda; }
  std::string describe() const override { return cat("cuda (", name_, ", cuda:", device_, ", cuBLAS)"); }
  bool computes_on_host() const override { return false; }

 protected:
  float run_quantize_ternary(const Tensor& w_in, Tensor& q_out) override {
    std::lock_guard<std::mutex> lock(mutex_);  // one op at a time on the shared cuBLAS handle
    Tensor w = input(w_in);
    Tensor q = output(q_out, false);
    const int64_t n = w.numel(), chunks = (n + HYBRIT_SUM_CHUNK - 1) / HYBRIT_SUM_CHUNK;
    double total = 0.0;
    if (chunks > 0) {
      Tensor sums = Tensor::empty({chunks}, DType::f64, dev());
      const int groups_per_block = kThreads / HYBRIT_SUM_LANES;
      chunk_abs_sums_kernel<<<unsigned((chunks + groups_per_block - 1) / groups_per_block), kThreads>>>(w.data<float>(), n, sums.data<double>(), chunks);
      fold_sums_kernel<<<1, 1024>>>(sums.data<double>(), chunks);
      CUDA_CHECK(cudaGetLastError());
      CUDA_CHECK(cudaMemcpy(&total, sums.raw(), sizeof total, cudaMemcpyDeviceToHost));
    }
    if (!std::isfinite(total)) {
      Tensor host = w_in.to(Device::cpu());
      raise_kernel_status(HYBRIT_C_NONFINITE, Op::quantize_ternary, hybrit_c_first_nonfinite(host.data<float>(), n), host.data<float>());
    }
    const float s = hybrit_c_ternary_scale(total, n);
    if (n > 0) ternary_kernel<<<blocks_for(n), kThreads>>>(w.data<float>(), n, hybrit_c_ternary_threshold(s), q.data<int8_t>());
    finish(q, q_out);
    return s;
  }

  void run_quantize_int8_rows(const Tensor& x_in, int64_t rows, int64_t cols, Tensor& q_out, Tensor& s_out) override {
    std::lock_guard<std::mutex> lock(mutex_);  // one op at a time on the shared cuBLAS handle
    Tensor x = input(x_in);
    Tensor q = output(q_out, false), s = output(s_out, false);
    BadIndex bad(device_);
    if (rows > 0) int8_rows_kernel<<<unsigned(rows), kThreads>>>(x.data<float>(), cols, q.data<int8_t>(), s.data<float>(), bad.ptr());
    CUDA_CHECK(cudaGetLastError());
    if (int64_t row = bad.get(); row >= 0) raise_kernel_status(HYBRIT_C_NONFINITE, Op::quantize_int8_rows, row);
    finish(q, q_out);
    finish(s, s_out);
  }

  void run_pack_ternary(const Tensor& q_in, int64_t rows, int64_t cols, Tensor& p_out) override {
    std::lock_guard<std::mutex> lock(mutex_);  // one op at a time on the shared cuBLAS handle
    Tensor q = input(q_in);
    Tensor p = output(p_out, false);
    BadIndex bad(device_);
    if (p.numel() > 0) pack_kernel<<<blocks_for(p.numel()), kThreads>>>(q.data<int8_t>(), rows, cols, p.data<uint8_t>(), bad.ptr());
    CUDA_CHECK(cudaGetLastError());
    if (int64_t i = bad.get(); i >= 0) raise_kernel_status(HYBRIT_C_BADVALUE, Op::pack_ternary, i);
    finish(p, p_out);
  }

  void run_unpack_ternary(const Tensor& p_in, int64_t rows, int64_t cols, Tensor& q_out) override {
    std::lock_guard<std::mutex> lock(mutex_);  // one op at a time on the shared cuBLAS handle
    Tensor p = input(p_in);
    Tensor q = output(q_out, false);
    BadIndex bad(device_);
    if (q.numel() > 0) unpack_kernel<<<blocks_for(q.numel()), kThreads>>>(p.data<uint8_t>(), rows, cols, q.data<int8_t>(), bad.ptr());
    CUDA_CHECK(cudaGetLastError());
    if (int64_t i = bad.get(); i >= 0) raise_kernel_status(HYBRIT_C_BADVALUE, Op::unpack_ternary, i);
    finish(q, q_out);
  }

  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
  void run_matmul(const Tensor& a_in, const Tensor& b_in, Tensor& c_out, int64_t m, int64_t n, int64_t k, const MatmulArgs& args) override {
    std::lock_guard<std::mutex> lock(mutex_);  // one op at a time on the shared cuBLAS handle
    Tensor c = output(c_out, args.beta != 0.0f);
    if (m == 0 || n == 0) return;
    Tensor a = input(a_in), b = input(b_in);
    if (k == 0) {  // cuBLAS rejects k = 0 with lda < 1 in some versions; C = beta * C
      scale_or_zero(c, args.beta);
    } else {
      CUBLAS_CHECK(cublasSgemm(cublas_, args.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, args.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, int(n), int(m),
                               int(k), &args.alpha, b.data<float>(), int(b.dim(1)), a.data<float>(), int(a.dim(1)), &args.beta,
                               c.data<float>(), int(n)));
    }
    finish(c, c_out);
  }

  void run_kmeans_assign(const Tensor& x_in, const Tensor& c_in, Tensor& l_out, Tensor& d_out) override {
    std::lock_guard<std::mutex> lock(mutex_);  // one op at a time on the shared cuBLAS handle
    const int64_t n = x_in.dim(0), d = x_in.dim(1), k = c_in.dim(0);
    if (n == 0) return;
    Tensor x = input(x_in), cen = input(c_in);
    Tensor labels = output(l_out, false), dist = output(d_out, false);
    Tensor xn = Tensor::empty({n}, DType::f32, dev()), cn = Tensor::empty({k}, DType::f32, dev());
    {
      BadIndex bad(device_);
      row_norms_kernel<<<blocks_for(k), kThreads>>>(cen.data<float>(), k, d, cn.data<float>(), bad.ptr());
      if (int64_t i = bad.get(); i >= 0) raise_kernel_status(HYBRIT_C_NONFINITE, Op::kmeans_assign, -1 - i);
    }
    {
      BadIndex bad(device_);
      row_norms_kernel<<<blocks_for(n), kThreads>>>(x.data<float>(), n, d, xn.data<float>(), bad.ptr());
      if (int64_t i = bad.get(); i >= 0) raise_kernel_status(HYBRIT_C_NONFINITE, Op::kmeans_assign, i);
    }
    init_best_kernel<<<blocks_for(n), kThreads>>>(n, dist.data<float>(), labels.data<int32_t>());
    // Tiles keep the dot-product matrix at most 64 Mi floats (256 MiB): the full n x k matrix is
    // never stored.
    const int64_t tile_k = std::min<int64_t>(k, 8192), tile_n = std::max<int64_t>(1, std::min<int64_t>(n, (64ll << 20) / tile_k));
    Tensor dots = Tensor::empty({tile_n * tile_k}, DType::f32, dev());
    const float one = 1.0f, zero = 0.0f;
    for (int64_t i0 = 0; i0 < n; i0 += tile_n) {
      const int64_t pn = std::min(tile_n, n - i0);
      for (int64_t c0 = 0; c0 < k; c0 += tile_k) {
        const int64_t pk = std::min(tile_k, k - c0);
        CUBLAS_CHECK(cublasSgemm(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, int(pk), int(pn), int(d), &one, cen.data<float>() + c0 * d, int(d),
                                 x.data<float>() + i0 * d, int(d), &zero, dots.data<float>(), int(pk)));
        argmin_tile_kernel<<<blocks_for(pn * 32), kThreads>>>(dots.data<float>(), pn, pk, c0, xn.data<float>() + i0, cn.data<float>(),
                                                             dist.data<float>() + i0, labels.data<int32_t>() + i0);
      }
    }
    clamp_zero_kernel<<<blocks_for(n), kThreads>>>(n, dist.data<float>());
    CUDA_CHECK(cudaGetLastError());
    finish(labels, l_out);
    finish(dist, d_out);
  }

  void run_matmul_ternary(const Tensor& x_in, const Tensor& s_in, const Tensor& w_in, float w_scale, Tensor& y_out, int64_t m, int64_t n,
                          int64_t k) override {
    std::lock_guard<std::mutex> lock(mutex_);
    Tensor xq = input(x_in), scales = input(s_in), w = input(w_in);
    Tensor y = output(y_out, false);
    if (m > 0 && n > 0) {
      if (n > int64_t(INT32_MAX)) fail(ErrorKind::invalid_argument, "matmul_ternary: ", n, " output columns are more than one CUDA grid holds (2^31 - 1)");
      const unsigned row_blocks = unsigned(std::min<int64_t>(m, 65535));  // gridDim.y's limit; the kernel strides over the rest
      matmul_ternary_kernel<<<dim3(unsigned(n), row_blocks), kThreads>>>(xq.data<int8_t>(), scales.data<float>(), m, k, w.data<uint8_t>(), w_scale, n,
                                                                        y.data<float>());
    }
    CUDA_CHECK(cudaGetLastError());
    finish(y, y_out);
  }

  void run_kmeans_update(const Tensor& x_in, const Tensor& l_in, Tensor& s_out, Tensor& c_out) override {
    std::lock_guard<std::mutex> lock(mutex_);  // one op at a time on the shared cuBLAS handle
    const int64_t n = x_in.dim(0), d = x_in.dim(1), k = s_out.dim(0);
    Tensor x = input(x_in), labels = input(l_in);
    Tensor sums = output(s_out, false), counts = output(c_out, false);
    CUDA_CHECK(cudaMemset(sums.raw(), 0, sums.nbytes()));
    CUDA_CHECK(cudaMemset(counts.raw(), 0, counts.nbytes()));
    BadIndex bad(device_);
    if (n * d > 0)
      update_kernel<<<blocks_for(n * d), kThreads>>>(x.data<float>(), n, d, labels.data<int32_t>(), k, sums.data<double>(),
                                                     reinterpret_cast<unsigned long long*>(counts.data<int64_t>()), bad.ptr());
    CUDA_CHECK(cudaGetLastError());
    if (int64_t i = bad.get(); i >= 0) raise_kernel_status(HYBRIT_C_BADVALUE, Op::kmeans_update, i);
    BadIndex nonfinite(device_);
    if (k * d > 0) finite_kernel<<<blocks_for(k * d), kThreads>>>(sums.data<double>(), k * d, nonfinite.ptr());
    if (nonfinite.get() >= 0) {
      Tensor host = x_in.to(Device::cpu());
      raise_kernel_status(HYBRIT_C_NONFINITE, Op::kmeans_update, hybrit_c_first_nonfinite(host.data<float>(), n * d) / std::max<int64_t>(d, 1));
    }
    finish(sums, s_out);
    finish(counts, c_out);
  }

 private:
  Device dev() const { return Device::cuda(device_); }

  void check_index(const Tensor& t) const {
    if (t.device().is_cuda() && t.device().index != device_)
      fail(ErrorKind::invalid_argument, "tensor on ", t.device().str(), " but this CUDA backend computes on cuda:", device_);
  }
  // The input's data on this GPU: the tensor itself, or an uploaded copy.
  Tensor input(const Tensor& t) {
    check_index(t);
    CUDA_CHECK(cudaSetDevice(device_));
    return t.device().is_cuda() ? t : t.to(dev());
  }
  // Where to write an output: in place when it is on this GPU, else a device buffer that
  // finish() downloads (uploaded first when the op reads it, as matmul does for beta != 0).
  Tensor output(Tensor& t, bool read_first) {
    check_index(t);
    if (t.device().is_cuda()) return t;
    return read_first ? t.to(dev()) : Tensor::empty(t.shape(), t.dtype(), dev());
  }
  void finish(const Tensor& work, Tensor& target) {
    CUDA_CHECK(cudaGetLastError());
    if (!target.device().is_cuda() && target.nbytes() > 0)
      CUDA_CHECK(cudaMemcpy(target.raw(), work.raw(), target.nbytes(), cudaMemcpyDeviceToHost));
  }
  void scale_or_zero(Tensor& c, float beta) {
    if (beta == 0.0f) CUDA_CHECK(cudaMemset(c.raw(), 0, c.nbytes()));
    else CUBLAS_CHECK(cublasSscal(cublas_, int(c.numel()), &beta, c.data<float>(), 1));
  }

  int device_;
  std::string name_;
  cublasHandle_t cublas_ = nullptr;
  std::mutex mutex_;
};

}  // namespace

bool cuda_backend_built() { return true; }

void probe_cuda(HardwareInfo& hw) {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    hw.cuda_status = status == cudaErrorNoDevice || status == cudaErrorInsufficientDriver
                         ? cat("no NVIDIA GPU or driver on this machine (CUDA runtime: ", cudaGetErrorString(status), ")")
                         : cat("no usable CUDA device: ", cudaGetErrorString(status));
    return;
  }
  if (count == 0) {
    hw.cuda_status = "no CUDA device found";
    return;
  }
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp p{};
    if (cudaGetDeviceProperties(&p, i) != cudaSuccess) continue;
    hw.cuda_devices.push_back({i, p.name, p.major, p.minor, p.totalGlobalMem, p.multiProcessorCount});
  }
  hw.cuda_status = cat(hw.cuda_devices.size(), " CUDA device(s)");
}

std::unique_ptr<Backend> make_cuda_backend(std::string* why_not) {
  const HardwareInfo& hw = hardware();
  if (hw.cuda_devices.empty()) {
    if (why_not) *why_not = hw.cuda_status;
    return nullptr;
  }
  register_cuda_memory({cuda_allocate, cuda_release, cuda_copy});
  try {
    return std::make_unique<CudaBackend>(0, hw.cuda_devices[0].name);
  } catch (const Error& e) {
    if (why_not) *why_not = e.what();
    return nullptr;
  }
}

}  // namespace hybrit
