/* AVX-512 (F, BW, VL, DQ) variants. Only called when the probe reports all four. */
#include <float.h>
#include <immintrin.h>
#include <pthread.h>
#include <math.h>
#include <stdint.h>

#include "hybrit_c.h"
#include "core/vexp.h"

static void chunk_abs_sums_avx512(const float* x, int64_t n, double* out) {
  for (int64_t c0 = 0; c0 < n; c0 += HYBRIT_SUM_CHUNK) {
    const int64_t len = n - c0 < HYBRIT_SUM_CHUNK ? n - c0 : HYBRIT_SUM_CHUNK;
    const float* p = x + c0;
    __m512d a0 = _mm512_setzero_pd(), a1 = a0; /* lanes 0-7 and 8-15 */
    int64_t i = 0;
    for (; i + 16 <= len; i += 16) {
      a0 = _mm512_add_pd(a0, _mm512_abs_pd(_mm512_cvtps_pd(_mm256_loadu_ps(p + i))));
      a1 = _mm512_add_pd(a1, _mm512_abs_pd(_mm512_cvtps_pd(_mm256_loadu_ps(p + i + 8))));
    }
    double lane[HYBRIT_SUM_LANES];
    _mm512_storeu_pd(lane, a0);
    _mm512_storeu_pd(lane + 8, a1);
    for (; i < len; ++i) lane[i % HYBRIT_SUM_LANES] += fabs((double)p[i]);
    for (int h = HYBRIT_SUM_LANES / 2; h >= 1; h /= 2)
      for (int l = 0; l < h; ++l) lane[l] += lane[l + h];
    out[c0 / HYBRIT_SUM_CHUNK] = lane[0];
  }
}

static void ternary_pass_avx512(const float* w, int64_t n, float s, float t, int8_t* q) {
  const __m512 pos = _mm512_set1_ps(t), neg = _mm512_set1_ps(-t);
  const __m512i one = _mm512_set1_epi32(1), minus_one = _mm512_set1_epi32(-1);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(w + i);
    const __mmask16 ge = _mm512_cmp_ps_mask(v, pos, _CMP_GE_OQ), le = _mm512_cmp_ps_mask(v, neg, _CMP_LE_OQ);
    const __m512i r = _mm512_mask_mov_epi32(_mm512_maskz_mov_epi32(ge, one), le, minus_one);
    _mm_storeu_si128((__m128i*)(q + i), _mm512_cvtepi32_epi8(r));
  }
  for (; i < n; ++i) q[i] = (int8_t)((w[i] >= t) - (w[i] <= -t));
  (void)s;
}

static float absmax_avx512(const float* x, int64_t n, int* finite) {
  const __m512 big = _mm512_set1_ps(FLT_MAX);
  __m512 m = _mm512_setzero_ps();
  __mmask16 ok = 0xffff;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 a = _mm512_abs_ps(_mm512_loadu_ps(x + i));
    ok &= _mm512_cmp_ps_mask(a, big, _CMP_LE_OQ);
    m = _mm512_max_ps(m, a);
  }
  float best = _mm512_reduce_max_ps(m);
  int all_ok = ok == 0xffff;
  for (; i < n; ++i) {
    const float a = fabsf(x[i]);
    all_ok &= a <= FLT_MAX;
    best = a > best ? a : best;
  }
  *finite = all_ok;
  return best;
}

static void int8_pass_avx512(const float* x, int64_t n, float s, int8_t* q) {
  const __m512 vs = _mm512_set1_ps(s), lo = _mm512_set1_ps(-128.0f), hi = _mm512_set1_ps(127.0f);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 v = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    _mm_storeu_si128((__m128i*)(q + i), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
  }
  for (; i < n; ++i) {
    const float r = rintf(x[i] * s);
    q[i] = (int8_t)(r > 127.0f ? 127 : (r < -128.0f ? -128 : (int)r));
  }
}

static void argmin_update_avx512(const float* dots, const float* cn, float xn, int64_t n, int32_t base, float* best,
                                 int32_t* arg) {
  /* Each lane keeps its own first minimum; the lane minima then merge by (value, index). */
  const __m512 vxn = _mm512_set1_ps(xn), two = _mm512_set1_ps(2.0f);
  __m512 vmin = _mm512_set1_ps(INFINITY);
  __m512i vidx = _mm512_set1_epi32(INT32_MAX), idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16, idx = _mm512_add_epi32(idx, step)) {
    const __m512 dd = _mm512_sub_ps(_mm512_add_ps(vxn, _mm512_loadu_ps(cn + j)), _mm512_mul_ps(two, _mm512_loadu_ps(dots + j)));
    const __mmask16 lt = _mm512_cmp_ps_mask(dd, vmin, _CMP_LT_OQ);
    vmin = _mm512_mask_mov_ps(vmin, lt, dd);
    vidx = _mm512_mask_mov_epi32(vidx, lt, idx);
  }
  float lane_min[16];
  int32_t lane_idx[16];
  _mm512_storeu_ps(lane_min, vmin);
  _mm512_storeu_si512(lane_idx, vidx);
  float b = INFINITY;
  int32_t a = INT32_MAX;
  for (int l = 0; l < 16; ++l)
    if (lane_min[l] < b || (lane_min[l] == b && lane_idx[l] < a)) b = lane_min[l], a = lane_idx[l];
  for (; j < n; ++j) {
    const float dd = (xn + cn[j]) - 2.0f * dots[j];
    if (dd < b) b = dd, a = (int32_t)j;
  }
  if (b < *best) {
    *best = b;
    *arg = base + a;
  }
}

enum { MR = 12, NR = 32 };

static void gemm_ukr_avx512(int64_t kc, const float* ap, const float* bp, float* c, int64_t ldc, float alpha, int m,
                            int n) {
  __m512 acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < kc; ++p, ap += MR, bp += NR) {
    const __m512 b0 = _mm512_load_ps(bp), b1 = _mm512_load_ps(bp + 16);
    for (int i = 0; i < MR; ++i) {
      const __m512 a = _mm512_set1_ps(ap[i]);
      acc[i][0] = _mm512_fmadd_ps(a, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(a, b1, acc[i][1]);
    }
  }
  const __m512 va = _mm512_set1_ps(alpha);
  for (int i = 0; i < m; ++i) {
    float* row = c + i * ldc;
    if (n == NR) {
      _mm512_storeu_ps(row, _mm512_fmadd_ps(va, acc[i][0], _mm512_loadu_ps(row)));
      _mm512_storeu_ps(row + 16, _mm512_fmadd_ps(va, acc[i][1], _mm512_loadu_ps(row + 16)));
    } else {
      /* Masked edges: lanes past n are neither read nor written. */
      const __mmask16 m0 = n >= 16 ? 0xffff : (__mmask16)((1u << n) - 1);
      const __mmask16 m1 = n >= 32 ? 0xffff : (n <= 16 ? 0 : (__mmask16)((1u << (n - 16)) - 1));
      _mm512_mask_storeu_ps(row, m0, _mm512_fmadd_ps(va, acc[i][0], _mm512_maskz_loadu_ps(m0, row)));
      _mm512_mask_storeu_ps(row + 16, m1, _mm512_fmadd_ps(va, acc[i][1], _mm512_maskz_loadu_ps(m1, row + 16)));
    }
  }
}

/* One block of 64 packed bytes per iteration; field t meets x[b*256 + t*64 ...]. AVX-512BW has no
 * u8 x s8 dot into int32 in one step, so madd(maddubs) as AVX2 does, twice as wide. */
static void ternary_dot_avx512(const int8_t* x, int rows, int64_t x_stride, const uint8_t* w, int64_t nbytes, int64_t* acc) {
  uint8_t last[64];
  const int64_t full = hybrit_ternary_whole_blocks(w, nbytes, last), blocks = (nbytes + 63) / 64;
  const __m512i three = _mm512_set1_epi8(3), ones = _mm512_set1_epi16(1);
  __m512i a[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
  for (int i = 0; i < rows; ++i) acc[i] = 0;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const __m512i p = _mm512_loadu_si512((const void*)(blk < full ? w + blk * 64 : last));
    const __m512i c0 = _mm512_and_si512(p, three), c1 = _mm512_and_si512(_mm512_srli_epi16(p, 2), three);
    const __m512i c2 = _mm512_and_si512(_mm512_srli_epi16(p, 4), three), c3 = _mm512_and_si512(_mm512_srli_epi16(p, 6), three);
    for (int i = 0; i < rows; ++i) {
      const int8_t* xb = x + i * x_stride + blk * 256;
      __m512i s = _mm512_maddubs_epi16(c0, _mm512_loadu_si512((const void*)xb));
      s = _mm512_add_epi16(s, _mm512_maddubs_epi16(c1, _mm512_loadu_si512((const void*)(xb + 64))));
      s = _mm512_add_epi16(s, _mm512_maddubs_epi16(c2, _mm512_loadu_si512((const void*)(xb + 128))));
      s = _mm512_add_epi16(s, _mm512_maddubs_epi16(c3, _mm512_loadu_si512((const void*)(xb + 192))));
      a[i] = _mm512_add_epi32(a[i], _mm512_madd_epi16(s, ones));
    }
    if ((blk & 4095) == 4095 || blk + 1 == blocks) {
      for (int i = 0; i < rows; ++i) {
        acc[i] += _mm512_reduce_add_epi32(a[i]);
        a[i] = _mm512_setzero_si512();
      }
    }
  }
}

/* With AVX-512 VNNI, vpdpbusd does u8 x s8 -> int32 in one instruction. Chosen at run time when
 * the CPU reports avx512vnni (Ice Lake, Zen 4 and later). */
__attribute__((target("avx512vnni"))) static void ternary_dot_avx512vnni(const int8_t* x, int rows, int64_t x_stride, const uint8_t* w,
                                                                          int64_t nbytes, int64_t* acc) {
  uint8_t last[64];
  const int64_t full = hybrit_ternary_whole_blocks(w, nbytes, last), blocks = (nbytes + 63) / 64;
  const __m512i three = _mm512_set1_epi8(3);
  __m512i a[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
  for (int i = 0; i < rows; ++i) acc[i] = 0;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const __m512i p = _mm512_loadu_si512((const void*)(blk < full ? w + blk * 64 : last));
    const __m512i c0 = _mm512_and_si512(p, three), c1 = _mm512_and_si512(_mm512_srli_epi16(p, 2), three);
    const __m512i c2 = _mm512_and_si512(_mm512_srli_epi16(p, 4), three), c3 = _mm512_and_si512(_mm512_srli_epi16(p, 6), three);
    for (int i = 0; i < rows; ++i) {
      const int8_t* xb = x + i * x_stride + blk * 256;
      __m512i s = _mm512_dpbusd_epi32(a[i], c0, _mm512_loadu_si512((const void*)xb));
      s = _mm512_dpbusd_epi32(s, c1, _mm512_loadu_si512((const void*)(xb + 64)));
      s = _mm512_dpbusd_epi32(s, c2, _mm512_loadu_si512((const void*)(xb + 128)));
      a[i] = _mm512_dpbusd_epi32(s, c3, _mm512_loadu_si512((const void*)(xb + 192)));
    }
    if ((blk & 4095) == 4095 || blk + 1 == blocks) {
      for (int i = 0; i < rows; ++i) {
        acc[i] += _mm512_reduce_add_epi32(a[i]);
        a[i] = _mm512_setzero_si512();
      }
    }
  }
}

/* Four weight rows against ROWS activation rows with VNNI: per 64-byte block, the four rows' packed
 * bytes are loaded once (the last, partial block through a mask, so no copy and no read past the
 * row), and for each of the block's four 2-bit fields the four code vectors meet each activation
 * row's 64 bytes: 16 accumulators, every load used four times. ROWS is a constant at each call
 * (the switch below), so the loops unroll and the accumulators stay in registers. */
#define PREFETCH_ROWS 8
__attribute__((target("avx512vnni"), always_inline)) static inline void ternary_4w_vnni(const int8_t* x, const int ROWS, int64_t x_stride,
                                                                                       const uint8_t* w, int64_t w_stride, int64_t nbytes,
                                                                                       int64_t* acc) {
  const int64_t blocks = (nbytes + 63) / 64;
  const __m512i three = _mm512_set1_epi8(3);
  __m512i a[4][4];
  for (int i = 0; i < ROWS; ++i)
    for (int r = 0; r < 4; ++r) {
      a[i][r] = _mm512_setzero_si512();
      acc[i * 4 + r] = 0;
    }
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t left = nbytes - blk * 64;
    const __mmask64 mask = left >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << left) - 1);
    __m512i p[4];
    for (int r = 0; r < 4; ++r) p[r] = _mm512_maskz_loadu_epi8(mask, (const void*)(w + r * w_stride + blk * 64));
    for (int r = 0; r < 4; ++r) _mm_prefetch((const char*)(w + (r + PREFETCH_ROWS) * w_stride + blk * 64), _MM_HINT_T0);
    for (int t = 0; t < 4; ++t) {
      __m512i c[4];
      for (int r = 0; r < 4; ++r) c[r] = _mm512_and_si512(_mm512_srli_epi16(p[r], (unsigned)(2 * t)), three);
      for (int i = 0; i < ROWS; ++i) {
        const __m512i xv = _mm512_loadu_si512((const void*)(x + i * x_stride + blk * 256 + t * 64));
        for (int r = 0; r < 4; ++r) a[i][r] = _mm512_dpbusd_epi32(a[i][r], c[r], xv);
      }
    }
    if ((blk & 4095) == 4095 || blk + 1 == blocks) {
      for (int i = 0; i < ROWS; ++i)
        for (int r = 0; r < 4; ++r) {
          acc[i * 4 + r] += _mm512_reduce_add_epi32(a[i][r]);
          a[i][r] = _mm512_setzero_si512();
        }
    }
  }
}

__attribute__((target("avx512vnni"))) static void ternary_dot4w_avx512vnni(const int8_t* x, int rows, int64_t x_stride, const uint8_t* w,
                                                                            int64_t w_stride, int64_t nbytes, int64_t* acc) {
  switch (rows) {
    case 1: ternary_4w_vnni(x, 1, x_stride, w, w_stride, nbytes, acc); break;
    case 2: ternary_4w_vnni(x, 2, x_stride, w, w_stride, nbytes, acc); break;
    case 3: ternary_4w_vnni(x, 3, x_stride, w, w_stride, nbytes, acc); break;
    default: ternary_4w_vnni(x, 4, x_stride, w, w_stride, nbytes, acc); break;
  }
}

static void exp_avx512(const float* x, float* y, int64_t n) { hybrit_exp_poly(x, y, n); }

static const hybrit_c_kernels avx512_kernels = {
    HYBRIT_ISA_AVX512, chunk_abs_sums_avx512, ternary_pass_avx512, absmax_avx512, int8_pass_avx512, argmin_update_avx512, MR, NR,
    144, 256, 2048, gemm_ukr_avx512, ternary_dot_avx512, exp_avx512, NULL};
static hybrit_c_kernels avx512_vnni_kernels;
static int with_vnni;
static pthread_once_t vnni_once = PTHREAD_ONCE_INIT;
static void pick_vnni(void) {
  avx512_vnni_kernels = avx512_kernels;
  avx512_vnni_kernels.ternary_dot = ternary_dot_avx512vnni;
  avx512_vnni_kernels.ternary_dot4w = ternary_dot4w_avx512vnni;
  __builtin_cpu_init();
  with_vnni = __builtin_cpu_supports("avx512vnni");
}

const hybrit_c_kernels* hybrit_c_kernels_avx512(void) {
  pthread_once(&vnni_once, pick_vnni);
  return with_vnni ? &avx512_vnni_kernels : &avx512_kernels;
}

const hybrit_c_kernels* hybrit_c_kernels_avx512_variant(int vnni) {
  pthread_once(&vnni_once, pick_vnni);
  if (!vnni) return &avx512_kernels;
  return with_vnni ? &avx512_vnni_kernels : 0;
}
