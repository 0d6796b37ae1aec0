/* Causal grouped-query attention, FlashAttention-2 style (see hybrit_c.h for the layout and the
 * determinism contract). Every score and value product is a small GEMM through the kernel
 * table's micro-kernel (hybrit_c_sgemm_ws), every exponential goes through kr->exp_n, so the
 * scalar table gives the reference and the AVX2 / AVX-512 tables the fast variants of the same
 * algorithm. Tiles are TILE x TILE and aligned on both axes, so a key tile is either fully
 * visible to a query tile, or it is the diagonal tile, where key column c is visible to query row
 * r when c <= r. */
#define _POSIX_C_SOURCE 200112L
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "hybrit_c.h"

enum { TILE = HYBRIT_ATTENTION_TILE };

static int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
static int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

/* Scratch of one thread, carved from one buffer (the GEMM panel first: it must be 64-byte aligned). */
typedef struct {
  float *gemm, *s, *dp, *acc, *m, *l, *corr, *delta;
} scratch;

static int64_t gemm_floats(const hybrit_c_kernels* kr, const hybrit_attention_shape* sh) {
  const int64_t big = imax(TILE, sh->head_dim);
  return (hybrit_c_sgemm_workspace(kr, big, big, big) + 15) / 16 * 16;
}

int64_t hybrit_c_attention_workspace(const hybrit_c_kernels* kr, const hybrit_attention_shape* sh) {
  const int64_t group = sh->heads / sh->kv_heads;
  return gemm_floats(kr, sh) + 2 * TILE * TILE + TILE * sh->head_dim + 3 * TILE + group * sh->seq + 64;
}

static scratch carve(const hybrit_c_kernels* kr, const hybrit_attention_shape* sh, float* w) {
  scratch s;
  s.gemm = w;
  w += gemm_floats(kr, sh);
  s.s = w, w += TILE * TILE;
  s.dp = w, w += TILE * TILE;
  s.acc = w, w += TILE * sh->head_dim;
  s.m = w, w += TILE;
  s.l = w, w += TILE;
  s.corr = w, w += TILE;
  s.delta = w;
  return s;
}

/* Number of keys of tile j0 (bc wide) that query row i (absolute) sees. */
static int64_t visible(int64_t i, int64_t j0, int64_t bc) { return imin(bc, imax(0, i - j0 + 1)); }

void hybrit_c_attention_forward(const hybrit_c_kernels* kr, const hybrit_attention_shape* sh, const float* q, const float* k, const float* v,
                                float* out, float* lse, int64_t u0, int64_t u1, float* workspace) {
  const int64_t T = sh->seq, H = sh->heads, KV = sh->kv_heads, hd = sh->head_dim, group = H / KV;
  const int64_t ldq = H * hd, ldk = KV * hd;
  scratch w = carve(kr, sh, workspace);
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t b = u / H, h = u % H, g = h / group;
    const float* Q = q + b * T * ldq + h * hd;
    const float* K = k + b * T * ldk + g * hd;
    const float* V = v + b * T * ldk + g * hd;
    float* O = out + b * T * ldq + h * hd;
    float* L = lse + (b * H + h) * T;
    for (int64_t i0 = 0; i0 < T; i0 += TILE) {
      const int64_t br = imin(TILE, T - i0);
      memset(w.acc, 0, (size_t)(br * hd) * sizeof(float));
      for (int64_t r = 0; r < br; ++r) w.m[r] = -INFINITY, w.l[r] = 0.0f;
      for (int64_t j0 = 0; j0 <= i0; j0 += TILE) {
        const int64_t bc = imin(TILE, T - j0);
        /* S (br x bc) = scale * Q_i K_j^T */
        hybrit_c_sgemm_ws(kr, 0, 1, br, bc, hd, sh->scale, Q + i0 * ldq, ldq, K + j0 * ldk, ldk, 0.0f, w.s, bc, w.gemm);
        for (int64_t r = 0; r < br; ++r) {
          float* row = w.s + r * bc;
          const int64_t n = visible(i0 + r, j0, bc);
          float mx = w.m[r];
          for (int64_t c = 0; c < n; ++c) mx = row[c] > mx ? row[c] : mx;
          for (int64_t c = 0; c < n; ++c) row[c] -= mx;
          for (int64_t c = n; c < bc; ++c) row[c] = -INFINITY;
          w.corr[r] = w.m[r] - mx; /* exp of it rescales what was accumulated (-inf on the first tile) */
          w.m[r] = mx;
        }
        kr->exp_n(w.s, w.s, br * bc);
        kr->exp_n(w.corr, w.corr, br);
        for (int64_t r = 0; r < br; ++r) {
          const float* row = w.s + r * bc;
          float sum = 0.0f;
          for (int64_t c = 0; c < bc; ++c) sum += row[c];
          w.l[r] = w.l[r] * w.corr[r] + sum;
          float* a = w.acc + r * hd;
          const float cr = w.corr[r];
          if (cr != 1.0f)
            for (int64_t c = 0; c < hd; ++c) a[c] *= cr;
        }
        /* acc (br x hd) += P V_j */
        hybrit_c_sgemm_ws(kr, 0, 0, br, hd, bc, 1.0f, w.s, bc, V + j0 * ldk, ldk, 1.0f, w.acc, hd, w.gemm);
      }
      for (int64_t r = 0; r < br; ++r) {
        const float inv = 1.0f / w.l[r];
        float* o = O + (i0 + r) * ldq;
        const float* a = w.acc + r * hd;
        for (int64_t c = 0; c < hd; ++c) o[c] = a[c] * inv;
        L[i0 + r] = w.m[r] + logf(w.l[r]);
      }
    }
  }
}

void hybrit_c_attention_backward(const hybrit_c_kernels* kr, const hybrit_attention_shape* sh, const float* q, const float* k, const float* v,
                                 const float* out, const float* dout, const float* lse, float* dq, float* dk, float* dv, int64_t u0,
                                 int64_t u1, float* workspace) {
  const int64_t T = sh->seq, H = sh->heads, KV = sh->kv_heads, hd = sh->head_dim, group = H / KV;
  const int64_t ldq = H * hd, ldk = KV * hd;
  scratch w = carve(kr, sh, workspace);
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t b = u / KV, g = u % KV;
    const float* K = k + b * T * ldk + g * hd;
    const float* V = v + b * T * ldk + g * hd;
    float* dK = dk + b * T * ldk + g * hd;
    float* dV = dv + b * T * ldk + g * hd;
    for (int64_t t = 0; t < T; ++t) {
      memset(dK + t * ldk, 0, (size_t)hd * sizeof(float));
      memset(dV + t * ldk, 0, (size_t)hd * sizeof(float));
    }
    /* delta[h][t] = dout . out over the head's row: the softmax backward's row term. */
    for (int64_t hl = 0; hl < group; ++hl) {
      const int64_t h = g * group + hl;
      for (int64_t t = 0; t < T; ++t) {
        const float* o = out + (b * T + t) * ldq + h * hd;
        const float* d = dout + (b * T + t) * ldq + h * hd;
        float acc = 0.0f;
        for (int64_t c = 0; c < hd; ++c) acc += o[c] * d[c];
        w.delta[hl * T + t] = acc;
        memset(dq + (b * T + t) * ldq + h * hd, 0, (size_t)hd * sizeof(float));
      }
    }
    for (int64_t j0 = 0; j0 < T; j0 += TILE) {
      const int64_t bc = imin(TILE, T - j0);
      for (int64_t hl = 0; hl < group; ++hl) {
        const int64_t h = g * group + hl;
        const float* Q = q + b * T * ldq + h * hd;
        const float* dO = dout + b * T * ldq + h * hd;
        float* dQ = dq + b * T * ldq + h * hd;
        const float* L = lse + (b * H + h) * T;
        const float* delta = w.delta + hl * T;
        for (int64_t i0 = j0; i0 < T; i0 += TILE) {
          const int64_t br = imin(TILE, T - i0);
          /* P = exp(scale * Q_i K_j^T - lse_i), zero where masked */
          hybrit_c_sgemm_ws(kr, 0, 1, br, bc, hd, sh->scale, Q + i0 * ldq, ldq, K + j0 * ldk, ldk, 0.0f, w.s, bc, w.gemm);
          for (int64_t r = 0; r < br; ++r) {
            float* row = w.s + r * bc;
            const int64_t n = visible(i0 + r, j0, bc);
            const float lr = L[i0 + r];
            for (int64_t c = 0; c < n; ++c) row[c] -= lr;
            for (int64_t c = n; c < bc; ++c) row[c] = -INFINITY;
          }
          kr->exp_n(w.s, w.s, br * bc);
          /* dV_j += P^T dO_i */
          hybrit_c_sgemm_ws(kr, 1, 0, bc, hd, br, 1.0f, w.s, bc, dO + i0 * ldq, ldq, 1.0f, dV + j0 * ldk, ldk, w.gemm);
          /* dP = dO_i V_j^T; dS = P (dP - delta) scale, into dp */
          hybrit_c_sgemm_ws(kr, 0, 1, br, bc, hd, 1.0f, dO + i0 * ldq, ldq, V + j0 * ldk, ldk, 0.0f, w.dp, bc, w.gemm);
          for (int64_t r = 0; r < br; ++r) {
            const float* p = w.s + r * bc;
            float* d = w.dp + r * bc;
            const float dr = delta[i0 + r];
            for (int64_t c = 0; c < bc; ++c) d[c] = p[c] * (d[c] - dr) * sh->scale;
          }
          /* dK_j += dS^T Q_i; dQ_i += dS K_j */
          hybrit_c_sgemm_ws(kr, 1, 0, bc, hd, br, 1.0f, w.dp, bc, Q + i0 * ldq, ldq, 1.0f, dK + j0 * ldk, ldk, w.gemm);
          hybrit_c_sgemm_ws(kr, 0, 0, br, hd, bc, 1.0f, w.dp, bc, K + j0 * ldk, ldk, 1.0f, dQ + i0 * ldq, ldq, w.gemm);
        }
      }
    }
  }
}

static float* alloc_workspace(const hybrit_c_kernels* kr, const hybrit_attention_shape* sh) {
  void* mem = NULL;
  if (posix_memalign(&mem, 64, (size_t)hybrit_c_attention_workspace(kr, sh) * sizeof(float)) != 0) return NULL;
  return (float*)mem;
}

int hybrit_c_attention_forward_all(const hybrit_c_kernels* kr, const hybrit_attention_shape* sh, const float* q, const float* k,
                                   const float* v, float* out, float* lse) {
  float* w = alloc_workspace(kr, sh);
  if (!w) return HYBRIT_C_NOMEM;
  hybrit_c_attention_forward(kr, sh, q, k, v, out, lse, 0, sh->batch * sh->heads, w);
  free(w);
  return HYBRIT_C_OK;
}

int hybrit_c_attention_backward_all(const hybrit_c_kernels* kr, const hybrit_attention_shape* sh, const float* q, const float* k,
                                    const float* v, const float* out, const float* dout, const float* lse, float* dq, float* dk, float* dv) {
  float* w = alloc_workspace(kr, sh);
  if (!w) return HYBRIT_C_NOMEM;
  hybrit_c_attention_backward(kr, sh, q, k, v, out, dout, lse, dq, dk, dv, 0, sh->batch * sh->kv_heads, w);
  free(w);
  return HYBRIT_C_OK;
}
