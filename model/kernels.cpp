#include "model/kernels.hpp"

#include <algorithm>
#include <cstring>

#include "core/vexp.h"

namespace hybrit::kernels {

void rmsnorm_rows(const float* x, const float* g, float* y, float* rinv, int64_t r0, int64_t r1, int64_t d, double eps) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * d;
    double ss = 0;
    for (int64_t j = 0; j < d; ++j) ss += double(xr[j]) * xr[j];
    const float ri = float(1.0 / std::sqrt(ss / double(d) + eps));
    if (rinv) rinv[r] = ri;
    float* yr = y + r * d;
    for (int64_t j = 0; j < d; ++j) yr[j] = xr[j] * ri * g[j];
  }
}

void rmsnorm_backward_rows(const float* dy, const float* x, const float* g, const float* rinv, const float* residual, float* dx, int64_t r0,
                           int64_t r1, int64_t d) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* dyr = dy + r * d;
    const float* xr = x + r * d;
    double dot = 0;
    for (int64_t j = 0; j < d; ++j) dot += double(dyr[j]) * g[j] * xr[j];
    const float ri = rinv[r], coeff = float(double(ri) * ri * ri * dot / double(d));
    float* dxr = dx + r * d;
    if (residual) {
      const float* res = residual + r * d;
      for (int64_t j = 0; j < d; ++j) dxr[j] = (ri * dyr[j] * g[j] - xr[j] * coeff) + res[j];
    } else {
      for (int64_t j = 0; j < d; ++j) dxr[j] = ri * dyr[j] * g[j] - xr[j] * coeff;
    }
  }
}

void rmsnorm_gain_grad_cols(const float* dy, const float* x, const float* rinv, float* dg, int64_t n, int64_t d, int64_t j0, int64_t j1) {
  for (int64_t r = 0; r < n; ++r) {
    const float* dyr = dy + r * d;
    const float* xr = x + r * d;
    const float ri = rinv[r];
    for (int64_t j = j0; j < j1; ++j) dg[j] += dyr[j] * xr[j] * ri;
  }
}

void rope_rows(float* x, int64_t r0, int64_t r1, int64_t heads, int64_t hd, int64_t seq, const float* cos_t, const float* sin_t, float sign) {
  const int64_t half = hd / 2;
  for (int64_t r = r0; r < r1; ++r) {
    const float* c = cos_t + (r % seq) * half;
    const float* s = sin_t + (r % seq) * half;
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + (r * heads + h) * hd;
      for (int64_t i = 0; i < half; ++i) {
        const float sn = sign * s[i], a = v[i], b = v[i + half];
        v[i] = a * c[i] - b * sn;
        v[i + half] = a * sn + b * c[i];
      }
    }
  }
}

namespace {
// The element-wise kernels heavy in exponentials are compiled for AVX-512, AVX2 and the baseline
// and picked at load time by the CPU (GCC function multi-versioning). -ffp-contract=off (in
// CMakeLists.txt) keeps every variant's arithmetic the same, so all give the same bits.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define HYBRIT_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define HYBRIT_MULTIVERSION
#endif

// sig[i] = 1 / (1 + exp(-g[i])) for n <= kBlock values, with the vectorizable exp.
constexpr int64_t kBlock = 256;
inline __attribute__((always_inline)) void sigmoid_block(const float* g, float* sig, int64_t n) {
  float neg[kBlock];
  for (int64_t i = 0; i < n; ++i) neg[i] = -g[i];
  hybrit_exp_poly(neg, sig, n);
  for (int64_t i = 0; i < n; ++i) sig[i] = 1.0f / (1.0f + sig[i]);
}
}  // namespace

float silu(float g) {
  float sig;
  sigmoid_block(&g, &sig, 1);
  return g * sig;
}

HYBRIT_MULTIVERSION void swiglu(const float* gate, const float* up, float* f, int64_t i0, int64_t i1) {
  float sig[kBlock];
  for (int64_t b = i0; b < i1; b += kBlock) {
    const int64_t n = std::min(kBlock, i1 - b);
    sigmoid_block(gate + b, sig, n);
    for (int64_t i = 0; i < n; ++i) f[b + i] = gate[b + i] * sig[i] * up[b + i];
  }
}

HYBRIT_MULTIVERSION void swiglu_backward(const float* gate, const float* up, const float* df, float* dgate, float* dup, int64_t i0, int64_t i1) {
  float sig[kBlock];
  for (int64_t b = i0; b < i1; b += kBlock) {
    const int64_t n = std::min(kBlock, i1 - b);
    sigmoid_block(gate + b, sig, n);
    for (int64_t i = 0; i < n; ++i) {
      const float g = gate[b + i], s = sig[i], d = df[b + i];
      dup[b + i] = d * g * s;
      dgate[b + i] = d * up[b + i] * s * (1.0f + g * (1.0f - s));
    }
  }
}

namespace {
// 16 floats as one value: GCC lowers it to one AVX-512 register, two AVX2 or four SSE ones per
// clone, with the same per-lane arithmetic (so the same bits) in each. Plain loops over arrays
// here were vectorized across the wrong loop.
// (Loads and stores are memcpy in place: a helper returning the vector type would change the
// calling convention between the clones.)
typedef float Lanes16 __attribute__((vector_size(64)));
static_assert(kAttentionBlock == 16, "attention_block_scores keeps one Lanes16 of scores per block");
}  // namespace

HYBRIT_MULTIVERSION void attention_block_scores(const float* q, int64_t heads, const float* keys_t, int64_t n, int64_t hd, float scale,
                                                float* scores) {
  // Every slot's lane is computed (a slot past n holds an earlier sequence's finite key or zero)
  // so each step is one full vector; only the first n are kept.
  for (int64_t h = 0; h < heads; ++h) {
    const float* qh = q + h * hd;
    Lanes16 acc = {};
    for (int64_t c = 0; c < hd; ++c) {
      Lanes16 key_c;
      std::memcpy(&key_c, keys_t + c * kAttentionBlock, sizeof key_c);
      acc += qh[c] * key_c;
    }
    acc *= scale;
    float out[kAttentionBlock];
    std::memcpy(out, &acc, sizeof acc);
    for (int64_t j = 0; j < n; ++j) scores[h * n + j] = out[j];
  }
}

HYBRIT_MULTIVERSION void attention_block_values(const float* p, int64_t heads, const float* values, int64_t stride, int64_t n, int64_t hd,
                                                float* out) {
  // 16 output values at a time stay in registers over the block's slots.
  for (int64_t h = 0; h < heads; ++h) {
    float* oh = out + h * hd;
    const float* ph = p + h * n;
    int64_t c0 = 0;
    for (; c0 + 16 <= hd; c0 += 16) {
      Lanes16 acc, value;
      std::memcpy(&acc, oh + c0, sizeof acc);
      for (int64_t j = 0; j < n; ++j) {
        std::memcpy(&value, values + j * stride + c0, sizeof value);
        acc += ph[j] * value;
      }
      std::memcpy(oh + c0, &acc, sizeof acc);
    }
    for (int64_t c = c0; c < hd; ++c) {
      float acc = oh[c];
      for (int64_t j = 0; j < n; ++j) acc += ph[j] * values[j * stride + c];
      oh[c] = acc;
    }
  }
}

HYBRIT_MULTIVERSION void exp_values(const float* x, float* y, int64_t n) { hybrit_exp_poly(x, y, n); }

void relu2(const float* up, float* f, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) f[i] = up[i] > 0 ? up[i] * up[i] : 0.0f;
}

void relu2_backward(const float* up, const float* df, float* dup, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) dup[i] = up[i] > 0 ? 2.0f * up[i] * df[i] : 0.0f;
}

void dequantize_ternary(const int8_t* q, float s, float* out, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) out[i] = float(q[i]) * s;
}

void dequantize_int8_rows(const int8_t* q, const float* scales, float* out, int64_t r0, int64_t r1, int64_t cols) {
  for (int64_t r = r0; r < r1; ++r) {
    const float s = scales[r];
    for (int64_t c = 0; c < cols; ++c) out[r * cols + c] = float(q[r * cols + c]) / s;
  }
}

void cross_entropy_rows(const float* logits, const int32_t* targets, double* lse, double* loss, int64_t r0, int64_t r1, int64_t v) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* lr = logits + r * v;
    const float m = *std::max_element(lr, lr + v);
    double sum = 0;
    for (int64_t j = 0; j < v; ++j) sum += std::exp(double(lr[j] - m));
    lse[r] = double(m) + std::log(sum);
    loss[r] = lse[r] - lr[targets[r]];
  }
}

void cross_entropy_backward_rows(const float* logits, const int32_t* targets, const double* lse, float inv_n, float* dlogits, int64_t r0,
                                 int64_t r1, int64_t v) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* lr = logits + r * v;
    float* dr = dlogits + r * v;
    for (int64_t j = 0; j < v; ++j) dr[j] = float(std::exp(double(lr[j]) - lse[r]));
    dr[targets[r]] -= 1.0f;
    for (int64_t j = 0; j < v; ++j) dr[j] *= inv_n;
  }
}

void embedding_rows(const float* table, const int32_t* tokens, float* x, int64_t r0, int64_t r1, int64_t d) {
  for (int64_t r = r0; r < r1; ++r) std::memcpy(x + r * d, table + int64_t(tokens[r]) * d, size_t(d) * sizeof(float));
}

void embedding_grad_cols(const float* dx, const int32_t* tokens, float* dtable, int64_t n, int64_t d, int64_t j0, int64_t j1) {
  for (int64_t r = 0; r < n; ++r) {
    float* row = dtable + int64_t(tokens[r]) * d;
    const float* src = dx + r * d;
    for (int64_t j = j0; j < j1; ++j) row[j] += src[j];
  }
}

}  // namespace hybrit::kernels
