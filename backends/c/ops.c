/* Scalar reference kernels and the ISA-independent drivers of the C backend. */
#define _POSIX_C_SOURCE 200112L /* posix_memalign: aligned_alloc is C11, this file is C99 */
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "gemm_pack.h"
#include "hybrit_c.h"

const hybrit_c_kernels* hybrit_c_kernels_avx2(void);
const hybrit_c_kernels* hybrit_c_kernels_avx512(void);

/* ---------------- scalar kernels: the reference every other variant must match ---------------- */

static double fold_lanes(double* v) {
  for (int h = HYBRIT_SUM_LANES / 2; h >= 1; h /= 2)
    for (int i = 0; i < h; ++i) v[i] += v[i + h];
  return v[0];
}

static void chunk_abs_sums_scalar(const float* x, int64_t n, double* out) {
  for (int64_t c0 = 0; c0 < n; c0 += HYBRIT_SUM_CHUNK) {
    const int64_t len = n - c0 < HYBRIT_SUM_CHUNK ? n - c0 : HYBRIT_SUM_CHUNK;
    double lane[HYBRIT_SUM_LANES] = {0};
    for (int64_t i = 0; i < len; ++i) lane[i % HYBRIT_SUM_LANES] += fabs((double)x[c0 + i]);
    out[c0 / HYBRIT_SUM_CHUNK] = fold_lanes(lane);
  }
}

static void ternary_pass_scalar(const float* w, int64_t n, float s, float t, int8_t* q) {
  (void)t;
  for (int64_t i = 0; i < n; ++i) {
    float r = rintf(w[i] / s);
    q[i] = (int8_t)(r > 1.0f ? 1 : (r < -1.0f ? -1 : (int)r));
  }
}

static float absmax_scalar(const float* x, int64_t n, int* finite) {
  float m = 0.0f;
  int ok = 1;
  for (int64_t i = 0; i < n; ++i) {
    float a = fabsf(x[i]);
    ok &= a <= FLT_MAX; /* false for NaN and Inf */
    m = a > m ? a : m;
  }
  *finite = ok;
  return m;
}

static void int8_pass_scalar(const float* x, int64_t n, float s, int8_t* q) {
  for (int64_t i = 0; i < n; ++i) {
    float r = rintf(x[i] * s);
    q[i] = (int8_t)(r > 127.0f ? 127 : (r < -128.0f ? -128 : (int)r));
  }
}

static void argmin_update_scalar(const float* dots, const float* cn, float xn, int64_t n, int32_t base, float* best,
                                 int32_t* arg) {
  float b = *best;
  int32_t a = *arg;
  for (int64_t j = 0; j < n; ++j) {
    const float dd = (xn + cn[j]) - 2.0f * dots[j];
    if (dd < b) {
      b = dd;
      a = base + (int32_t)j;
    }
  }
  *best = b;
  *arg = a;
}

enum { SCALAR_MR = 4, SCALAR_NR = 8 };

static void gemm_ukr_scalar(int64_t kc, const float* ap, const float* bp, float* c, int64_t ldc, float alpha, int m,
                            int n) {
  float acc[SCALAR_MR][SCALAR_NR] = {{0}};
  for (int64_t p = 0; p < kc; ++p, ap += SCALAR_MR, bp += SCALAR_NR)
    for (int i = 0; i < SCALAR_MR; ++i)
      for (int j = 0; j < SCALAR_NR; ++j) acc[i][j] += ap[i] * bp[j];
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) c[i * ldc + j] += alpha * acc[i][j];
}

static void ternary_dot_scalar(const int8_t* x, int rows, int64_t x_stride, const uint8_t* w, int64_t nbytes, int64_t* acc) {
  for (int i = 0; i < rows; ++i) {
    const int8_t* xi = x + i * x_stride;
    int64_t total = 0;
    for (int64_t b = 0; b < nbytes; ++b) {
      const uint8_t c = w[b];
      const int8_t* xb = xi + (b >> 6) * HYBRIT_TERNARY_BLOCK + (b & 63);
      total += (int64_t)(c & 3) * xb[0] + (int64_t)((c >> 2) & 3) * xb[64] + (int64_t)((c >> 4) & 3) * xb[128] + (int64_t)(c >> 6) * xb[192];
    }
    acc[i] = total;
  }
}

static void exp_scalar(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] < -87.3f ? 0.0f : expf(x[i]);
}

static const hybrit_c_kernels scalar_kernels = {
    HYBRIT_ISA_SCALAR, chunk_abs_sums_scalar, ternary_pass_scalar, absmax_scalar, int8_pass_scalar, argmin_update_scalar,
    SCALAR_MR,         SCALAR_NR,             128,                 256,           1024,             gemm_ukr_scalar,
    ternary_dot_scalar, exp_scalar, NULL};

/* ---------------- selection ---------------- */

const hybrit_c_kernels* hybrit_c_kernels_for(hybrit_isa isa) {
  switch (isa) {
    case HYBRIT_ISA_AVX512: return hybrit_c_kernels_avx512();
    case HYBRIT_ISA_AVX2: return hybrit_c_kernels_avx2();
    default: return &scalar_kernels;
  }
}


/* ---------------- quantization and packing ---------------- */

double hybrit_c_fold_sums(double* a, int64_t m) {
  if (m == 0) return 0.0;
  for (int64_t s = 1; s < m; s *= 2)
    for (int64_t i = 0; i + s < m; i += 2 * s) a[i] += a[i + s];
  return a[0];
}

float hybrit_c_ternary_scale(double abs_sum, int64_t n) {
  const float s = n ? (float)(abs_sum / (double)n) : 0.0f;
  return s > 1e-5f ? s : 1e-5f;
}

/* rint(w / s) is monotone in w, so {w : rint(w / s) >= 1} is [t, inf); walk to its edge. */
float hybrit_c_ternary_threshold(float s) {
  float t = 0.5f * s;
  while (t > 0.0f && rintf(t / s) >= 1.0f) t = nextafterf(t, 0.0f);
  while (!(rintf(t / s) >= 1.0f)) t = nextafterf(t, INFINITY);
  return t;
}

int64_t hybrit_c_first_nonfinite(const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!(fabsf(x[i]) <= FLT_MAX)) return i;
  return -1;
}

int hybrit_c_quantize_ternary(const hybrit_c_kernels* kr, const float* w, int64_t n, int8_t* q, float* scale, int64_t* bad_index) {
  const int64_t chunks = (n + HYBRIT_SUM_CHUNK - 1) / HYBRIT_SUM_CHUNK;
  double* sums = (double*)malloc((size_t)(chunks ? chunks : 1) * sizeof(double));
  if (!sums) return HYBRIT_C_NOMEM;
  kr->chunk_abs_sums(w, n, sums);
  const double total = hybrit_c_fold_sums(sums, chunks);
  free(sums);
  /* A double sum of |float| values cannot overflow, so a non-finite total means NaN/Inf input. */
  if (!isfinite(total)) {
    *bad_index = hybrit_c_first_nonfinite(w, n);
    return HYBRIT_C_NONFINITE;
  }
  const float s = hybrit_c_ternary_scale(total, n);
  kr->ternary_pass(w, n, s, hybrit_c_ternary_threshold(s), q);
  *scale = s;
  return HYBRIT_C_OK;
}

int hybrit_c_quantize_int8_rows(const hybrit_c_kernels* kr, const float* x, int64_t rows, int64_t cols, int8_t* q, float* scales,
                                int64_t* bad_index) {
  for (int64_t r = 0; r < rows; ++r) {
    int finite = 1;
    const float amax = kr->absmax(x + r * cols, cols, &finite);
    if (!finite) {
      *bad_index = r;
      return HYBRIT_C_NONFINITE;
    }
    const float s = 127.0f / (amax > 1e-5f ? amax : 1e-5f);
    kr->int8_pass(x + r * cols, cols, s, q + r * cols);
    scales[r] = s;
  }
  return HYBRIT_C_OK;
}

/* Four int8 weights in one little-endian word -> one byte of 2-bit codes, by SWAR: add 1 to each
 * byte without carries, check every byte is at most 2, then fold bytes 1-3 onto byte 0. */
static inline int pack_word(uint32_t w, uint8_t* out) {
  const uint32_t x = ((w & 0x7f7f7f7fu) + 0x01010101u) ^ (w & 0x80808080u);
  if ((x & 0xfcfcfcfcu) | (x & (x >> 1) & 0x01010101u)) return 0; /* a byte above 2 */
  *out = (uint8_t)(x | (x >> 6) | (x >> 12) | (x >> 18));
  return 1;
}

static int64_t first_bad_weight(const int8_t* q, int64_t n) {
  for (int64_t j = 0; j < n; ++j)
    if (q[j] < -1 || q[j] > 1) return j;
  return 0;
}

int hybrit_c_pack_ternary(const int8_t* q, int64_t rows, int64_t cols, uint8_t* packed, int64_t* bad_index) {
  const int64_t pc = hybrit_packed_cols(cols), full = cols / 4;
  for (int64_t r = 0; r < rows; ++r) {
    const int8_t* row = q + r * cols;
    uint8_t* out = packed + r * pc;
    int ok = 1;
    for (int64_t b = 0; b < full; ++b) {
      uint32_t w;
      memcpy(&w, row + 4 * b, 4);
      ok &= pack_word(w, out + b);
    }
    if (full < pc) { /* a partial last byte: missing weights are zeros */
      int8_t tail[4] = {0, 0, 0, 0};
      memcpy(tail, row + 4 * full, (size_t)(cols - 4 * full));
      uint32_t w;
      memcpy(&w, tail, 4);
      ok &= pack_word(w, out + full);
    }
    if (!ok) {
      *bad_index = r * cols + first_bad_weight(row, cols);
      return HYBRIT_C_BADVALUE;
    }
  }
  return HYBRIT_C_OK;
}

/* byte -> four decoded int8 weights (little-endian word); code 0b11 decodes to 0x7f, a marker no
 * valid weight has. */
static uint32_t unpack_table[256];
static void build_unpack_table(void) {
  for (unsigned b = 0; b < 256; ++b) {
    uint32_t word = 0;
    for (int j = 0; j < 4; ++j) {
      const unsigned code = (b >> (2 * j)) & 3u;
      const uint8_t v = code == 3u ? 0x7f : (uint8_t)(int8_t)((int)code - 1);
      word |= (uint32_t)v << (8 * j);
    }
    unpack_table[b] = word;
  }
}

int hybrit_c_unpack_ternary(const uint8_t* packed, int64_t rows, int64_t cols, int8_t* q, int64_t* bad_index) {
  static pthread_once_t once = PTHREAD_ONCE_INIT;
  pthread_once(&once, build_unpack_table); /* callers may run on many threads at once */
  const int64_t pc = hybrit_packed_cols(cols), full = cols / 4;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* in = packed + r * pc;
    int8_t* row = q + r * cols;
    unsigned invalid = 0; /* a code 0b11 has both bits set: b & (b >> 1) & 0x55 */
    for (int64_t b = 0; b < full; ++b) {
      const uint32_t w = unpack_table[in[b]];
      invalid |= in[b] & (in[b] >> 1) & 0x55u;
      memcpy(row + 4 * b, &w, 4);
    }
    if (full < pc) {
      const unsigned used = (1u << (2 * (cols - 4 * full))) - 1u; /* only the slots that hold weights */
      const unsigned last = in[full] & used;
      invalid |= last & (last >> 1) & 0x55u;
      const uint32_t w = unpack_table[in[full]];
      for (int64_t j = 4 * full; j < cols; ++j) row[j] = (int8_t)(uint8_t)(w >> (8 * (j - 4 * full)));
    }
    if (invalid) {
      for (int64_t j = 0; j < cols; ++j)
        if (((in[j / 4] >> (2 * (j & 3))) & 3u) == 3u) {
          *bad_index = r * cols + j;
          return HYBRIT_C_BADVALUE;
        }
    }
  }
  return HYBRIT_C_OK;
}

/* ---------------- GEMM: BLIS-style blocking around the selected micro-kernel ---------------- */

static void scale_c(int64_t M, int64_t N, float beta, float* C, int64_t ldc) {
  if (beta == 1.0f) return;
  for (int64_t i = 0; i < M; ++i) {
    float* row = C + i * ldc;
    if (beta == 0.0f)
      memset(row, 0, (size_t)N * sizeof(float));
    else
      for (int64_t j = 0; j < N; ++j) row[j] *= beta;
  }
}

void hybrit_c_gemm_packed(const hybrit_c_kernels* kr, int64_t M, int64_t N, int64_t K, float alpha, const float* ap, int64_t a_stride,
                          const float* bp, int64_t b_stride, float* C, int64_t ldc) {
  for (int64_t jr = 0; jr < N; jr += kr->nr)
    for (int64_t ir = 0; ir < M; ir += kr->mr) {
      const int m = (int)(M - ir < kr->mr ? M - ir : kr->mr);
      const int n = (int)(N - jr < kr->nr ? N - jr : kr->nr);
      kr->gemm_ukr(K, ap + (ir / kr->mr) * a_stride, bp + (jr / kr->nr) * b_stride, C + ir * ldc + jr, ldc, alpha, m, n);
    }
}

int hybrit_c_sgemm(const hybrit_c_kernels* kr, int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                   int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return HYBRIT_C_OK;
  scale_c(M, N, beta, C, ldc);
  if (K == 0 || alpha == 0.0f) return HYBRIT_C_OK;
  const int64_t MC = kr->mc, KC = kr->kc, NC = kr->nc;
  /* Pack buffers sized to this problem: a small GEMM must not pay for a 2 MiB allocation. */
  const int64_t mc_max = (M < MC ? M : MC) + kr->mr, nc_max = (N < NC ? N : NC) + kr->nr, kc_max = K < KC ? K : KC;
  void *ap_mem = NULL, *bp_mem = NULL;
  const int ap_rc = posix_memalign(&ap_mem, 64, (size_t)(mc_max * kc_max) * sizeof(float));
  const int bp_rc = posix_memalign(&bp_mem, 64, (size_t)(nc_max * kc_max) * sizeof(float));
  float* ap = ap_rc == 0 ? (float*)ap_mem : NULL;
  float* bp = bp_rc == 0 ? (float*)bp_mem : NULL;
  if (!ap || !bp) {
    free(ap);
    free(bp);
    return HYBRIT_C_NOMEM;
  }
  for (int64_t jc = 0; jc < N; jc += NC) {
    const int64_t nc = N - jc < NC ? N - jc : NC;
    for (int64_t pc = 0; pc < K; pc += KC) {
      const int64_t kc = K - pc < KC ? K - pc : KC;
      hybrit_pack_b(trans_b, B, ldb, pc, jc, kc, nc, kr->nr, bp);
      for (int64_t ic = 0; ic < M; ic += MC) {
        const int64_t mc = M - ic < MC ? M - ic : MC;
        hybrit_pack_a(trans_a, A, lda, ic, pc, mc, kc, kr->mr, ap);
        hybrit_c_gemm_packed(kr, mc, nc, kc, alpha, ap, kr->mr * kc, bp, kr->nr * kc, C + ic * ldc + jc, ldc);
      }
    }
  }
  free(ap);
  free(bp);
  return HYBRIT_C_OK;
}

/* ---------------- k-means ---------------- */

/* Squared norms in double, rounded once to float; the index of the first non-finite one, or -1. */
static int64_t row_norms(const float* X, int64_t n, int64_t d, float* out) {
  int64_t bad = -1;
  for (int64_t i = 0; i < n; ++i) {
    double s = 0.0;
    for (int64_t j = 0; j < d; ++j) s += (double)X[i * d + j] * (double)X[i * d + j];
    out[i] = (float)s;
    if (bad < 0 && !(out[i] <= FLT_MAX)) bad = i;
  }
  return bad;
}

/* Points per block and centroids per tile: the dot-product tile (256 x 1024 floats, 1 MiB) stays in
 * L2, and the centroid tile is packed once per 256 points. The tbb backend splits points at
 * multiples of the block, so its results equal these bit for bit. */
enum { ASSIGN_BLOCK_POINTS = 256, ASSIGN_BLOCK_CENTROIDS = 1024 };

int hybrit_c_kmeans_assign(const hybrit_c_kernels* kr, const float* X, int64_t n, int64_t d, const float* C, int64_t k, int32_t* labels,
                           float* dist, int64_t* bad_index) {
  if (n == 0) return HYBRIT_C_OK;
  float* cn = (float*)malloc((size_t)k * sizeof(float));
  float* xn = (float*)malloc(ASSIGN_BLOCK_POINTS * sizeof(float));
  float* dots = (float*)malloc((size_t)ASSIGN_BLOCK_POINTS * ASSIGN_BLOCK_CENTROIDS * sizeof(float));
  int rc = HYBRIT_C_OK;
  if (!cn || !xn || !dots) {
    rc = HYBRIT_C_NOMEM;
    goto done;
  }
  int64_t bad = row_norms(C, k, d, cn);
  if (bad >= 0) {
    *bad_index = -1 - bad;
    rc = HYBRIT_C_NONFINITE;
    goto done;
  }
  for (int64_t i0 = 0; i0 < n; i0 += ASSIGN_BLOCK_POINTS) {
    const int64_t bp = n - i0 < ASSIGN_BLOCK_POINTS ? n - i0 : ASSIGN_BLOCK_POINTS;
    bad = row_norms(X + i0 * d, bp, d, xn);
    if (bad >= 0) {
      *bad_index = i0 + bad;
      rc = HYBRIT_C_NONFINITE;
      goto done;
    }
    for (int64_t i = 0; i < bp; ++i) {
      dist[i0 + i] = INFINITY;
      labels[i0 + i] = 0;
    }
    for (int64_t c0 = 0; c0 < k; c0 += ASSIGN_BLOCK_CENTROIDS) {
      const int64_t bk = k - c0 < ASSIGN_BLOCK_CENTROIDS ? k - c0 : ASSIGN_BLOCK_CENTROIDS;
      hybrit_c_sgemm(kr, 0, 1, bp, bk, d, 1.0f, X + i0 * d, d, C + c0 * d, d, 0.0f, dots, bk);
      for (int64_t i = 0; i < bp; ++i)
        kr->argmin_update(dots + i * bk, cn + c0, xn[i], bk, (int32_t)c0, dist + i0 + i, labels + i0 + i);
    }
    for (int64_t i = 0; i < bp; ++i)
      if (dist[i0 + i] < 0.0f) dist[i0 + i] = 0.0f; /* cancellation can dip below zero */
  }
done:
  free(cn);
  free(xn);
  free(dots);
  return rc;
}

int hybrit_c_kmeans_update(const float* X, int64_t n, int64_t d, const int32_t* labels, int64_t k, double* sums,
                           int64_t* counts, int64_t* bad_index) {
  memset(sums, 0, (size_t)(k * d) * sizeof(double));
  memset(counts, 0, (size_t)k * sizeof(int64_t));
  for (int64_t i = 0; i < n; ++i) {
    const int32_t l = labels[i];
    if (l < 0 || l >= k) {
      *bad_index = i;
      return HYBRIT_C_BADVALUE;
    }
    counts[l] += 1;
    double* s = sums + (int64_t)l * d;
    const float* x = X + i * d;
    for (int64_t j = 0; j < d; ++j) s[j] += (double)x[j];
  }
  for (int64_t c = 0; c < k * d; ++c)
    if (!isfinite(sums[c])) {
      *bad_index = hybrit_c_first_nonfinite(X, n * d) / (d ? d : 1);
      return HYBRIT_C_NONFINITE;
    }
  return HYBRIT_C_OK;
}

/* ---------------- ternary matmul ---------------- */

void hybrit_c_ternary_prepare(const int8_t* xq, int64_t m, int64_t k, int8_t* x_blocked, int64_t* x_sums) {
  const int64_t kp = hybrit_ternary_padded(k);
  for (int64_t i = 0; i < m; ++i) {
    const int8_t* src = xq + i * k;
    int8_t* dst = x_blocked + i * kp;
    memset(dst, 0, (size_t)kp);
    int64_t sum = 0;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t block = j / HYBRIT_TERNARY_BLOCK, within = j % HYBRIT_TERNARY_BLOCK;
      dst[block * HYBRIT_TERNARY_BLOCK + (within & 3) * 64 + (within >> 2)] = src[j];
      sum += src[j];
    }
    x_sums[i] = sum;
  }
}

void hybrit_c_ternary_rows(const hybrit_c_kernels* kr, const int8_t* x_blocked, const int64_t* x_sums, const float* x_scales, int64_t m,
                           int64_t k, const uint8_t* w, float w_scale, int64_t n_begin, int64_t n_end, float* y, int64_t ldy) {
  const int64_t kp = hybrit_ternary_padded(k), nbytes = hybrit_packed_cols(k);
  int64_t acc[4];
  double factor[64]; /* w_scale / x_scale per activation row: one division per row, not per output */
  for (int64_t base = 0; base < m; base += 64) {
    const int64_t group = m - base < 64 ? m - base : 64;
    for (int64_t i = 0; i < group; ++i) factor[i] = (double)w_scale / (double)x_scales[base + i];
    int64_t r = n_begin;
    if (kr->ternary_dot4w) {
      int64_t acc16[16];
      for (; r + 4 <= n_end; r += 4) {
        for (int64_t i0 = 0; i0 < group; i0 += 4) {
          const int rows = group - i0 < 4 ? (int)(group - i0) : 4;
          kr->ternary_dot4w(x_blocked + (base + i0) * kp, rows, kp, w + r * nbytes, nbytes, nbytes, acc16);
          for (int i = 0; i < rows; ++i)
            for (int c = 0; c < 4; ++c)
              y[(base + i0 + i) * ldy + r + c] = (float)((double)(acc16[i * 4 + c] - x_sums[base + i0 + i]) * factor[i0 + i]);
        }
      }
    }
    for (; r < n_end; ++r) {
      const uint8_t* wr = w + r * nbytes;
      for (int64_t i0 = 0; i0 < group; i0 += 4) {
        const int rows = group - i0 < 4 ? (int)(group - i0) : 4;
        kr->ternary_dot(x_blocked + (base + i0) * kp, rows, kp, wr, nbytes, acc);
        for (int i = 0; i < rows; ++i) y[(base + i0 + i) * ldy + r] = (float)((double)(acc[i] - x_sums[base + i0 + i]) * factor[i0 + i]);
      }
    }
  }
}

int hybrit_c_matmul_ternary(const hybrit_c_kernels* kr, const int8_t* xq, const float* x_scales, int64_t m, int64_t k, const uint8_t* w,
                            int64_t n, float w_scale, float* y) {
  int8_t* xb = (int8_t*)malloc((size_t)(m * hybrit_ternary_padded(k)) + 64);
  int64_t* sums = (int64_t*)malloc((size_t)m * sizeof(int64_t) + 8);
  if (!xb || !sums) {
    free(xb);
    free(sums);
    return HYBRIT_C_NOMEM;
  }
  hybrit_c_ternary_prepare(xq, m, k, xb, sums);
  int status = HYBRIT_C_OK;
  if (hybrit_c_ternary_uses_amx(kr, m)) {
    int8_t* xa = (int8_t*)malloc((size_t)hybrit_ternary_amx_bytes(m, k));
    if (xa) {
      hybrit_c_ternary_amx_layout(xb, m, k, xa, 0, (m + 15) / 16);
      status = hybrit_c_ternary_rows_amx(xa, sums, x_scales, m, k, w, w_scale, 0, n, y, n);
    } else {
      status = HYBRIT_C_NOMEM;
    }
    free(xa);
  } else {
    hybrit_c_ternary_rows(kr, xb, sums, x_scales, m, k, w, w_scale, 0, n, y, n);
  }
  free(xb);
  free(sums);
  return status;
}
