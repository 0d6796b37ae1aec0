/* AVX2 + FMA variants. Compiled with -mavx2 -mfma; only called when the probe reports both. */
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "hybrit_c.h"
#include "core/vexp.h"

static void chunk_abs_sums_avx2(const float* x, int64_t n, double* out) {
  const __m256d abs_mask = _mm256_castsi256_pd(_mm256_set1_epi64x(0x7fffffffffffffffLL));
  for (int64_t c0 = 0; c0 < n; c0 += HYBRIT_SUM_CHUNK) {
    const int64_t len = n - c0 < HYBRIT_SUM_CHUNK ? n - c0 : HYBRIT_SUM_CHUNK;
    const float* p = x + c0;
    /* a0..a3 hold lanes 0-3, 4-7, 8-11, 12-15 of the canonical order. */
    __m256d a0 = _mm256_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 16 <= len; i += 16) {
      a0 = _mm256_add_pd(a0, _mm256_and_pd(_mm256_cvtps_pd(_mm_loadu_ps(p + i)), abs_mask));
      a1 = _mm256_add_pd(a1, _mm256_and_pd(_mm256_cvtps_pd(_mm_loadu_ps(p + i + 4)), abs_mask));
      a2 = _mm256_add_pd(a2, _mm256_and_pd(_mm256_cvtps_pd(_mm_loadu_ps(p + i + 8)), abs_mask));
      a3 = _mm256_add_pd(a3, _mm256_and_pd(_mm256_cvtps_pd(_mm_loadu_ps(p + i + 12)), abs_mask));
    }
    double lane[HYBRIT_SUM_LANES];
    _mm256_storeu_pd(lane, a0);
    _mm256_storeu_pd(lane + 4, a1);
    _mm256_storeu_pd(lane + 8, a2);
    _mm256_storeu_pd(lane + 12, a3);
    for (; i < len; ++i) lane[i % HYBRIT_SUM_LANES] += fabs((double)p[i]);
    for (int h = HYBRIT_SUM_LANES / 2; h >= 1; h /= 2)
      for (int l = 0; l < h; ++l) lane[l] += lane[l + h];
    out[c0 / HYBRIT_SUM_CHUNK] = lane[0];
  }
}

/* Four vectors of eight int32 in [-128, 127] -> 32 int8 in order. */
static inline __m256i narrow_32(__m256i r0, __m256i r1, __m256i r2, __m256i r3) {
  const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(r0, r1), _mm256_packs_epi32(r2, r3));
  return _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

static inline __m256i ternary8(const float* w, __m256 pos, __m256 neg) {
  const __m256 v = _mm256_loadu_ps(w);
  const __m256i ge = _mm256_castps_si256(_mm256_cmp_ps(v, pos, _CMP_GE_OQ));
  const __m256i le = _mm256_castps_si256(_mm256_cmp_ps(v, neg, _CMP_LE_OQ));
  return _mm256_sub_epi32(le, ge); /* masks are -1 where true */
}

static void ternary_pass_avx2(const float* w, int64_t n, float s, float t, int8_t* q) {
  const __m256 pos = _mm256_set1_ps(t), neg = _mm256_set1_ps(-t);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32)
    _mm256_storeu_si256((__m256i*)(q + i), narrow_32(ternary8(w + i, pos, neg), ternary8(w + i + 8, pos, neg),
                                                     ternary8(w + i + 16, pos, neg), ternary8(w + i + 24, pos, neg)));
  for (; i < n; ++i) q[i] = (int8_t)((w[i] >= t) - (w[i] <= -t));
  (void)s;
}

static float absmax_avx2(const float* x, int64_t n, int* finite) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), big = _mm256_set1_ps(FLT_MAX);
  __m256 m = _mm256_setzero_ps(), ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 a = _mm256_and_ps(_mm256_loadu_ps(x + i), abs_mask);
    ok = _mm256_and_ps(ok, _mm256_cmp_ps(a, big, _CMP_LE_OQ));
    m = _mm256_max_ps(m, a);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, m);
  float best = 0.0f;
  for (int l = 0; l < 8; ++l) best = lanes[l] > best ? lanes[l] : best;
  int all_ok = _mm256_movemask_ps(ok) == 0xff;
  for (; i < n; ++i) {
    const float a = fabsf(x[i]);
    all_ok &= a <= FLT_MAX;
    best = a > best ? a : best;
  }
  *finite = all_ok;
  return best;
}

static inline __m256i int8x8(const float* x, __m256 s) {
  __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x), s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  v = _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-128.0f)), _mm256_set1_ps(127.0f));
  return _mm256_cvtps_epi32(v);
}

static void int8_pass_avx2(const float* x, int64_t n, float s, int8_t* q) {
  const __m256 vs = _mm256_set1_ps(s);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32)
    _mm256_storeu_si256((__m256i*)(q + i),
                        narrow_32(int8x8(x + i, vs), int8x8(x + i + 8, vs), int8x8(x + i + 16, vs), int8x8(x + i + 24, vs)));
  for (; i < n; ++i) {
    const float r = rintf(x[i] * s);
    q[i] = (int8_t)(r > 127.0f ? 127 : (r < -128.0f ? -128 : (int)r));
  }
}

static void argmin_update_avx2(const float* dots, const float* cn, float xn, int64_t n, int32_t base, float* best,
                               int32_t* arg) {
  /* Each lane keeps its own first minimum; the lane minima then merge by (value, index). */
  const __m256 vxn = _mm256_set1_ps(xn), two = _mm256_set1_ps(2.0f);
  __m256 vmin = _mm256_set1_ps(INFINITY);
  __m256i vidx = _mm256_set1_epi32(INT32_MAX), idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i step = _mm256_set1_epi32(8);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8, idx = _mm256_add_epi32(idx, step)) {
    const __m256 dd = _mm256_sub_ps(_mm256_add_ps(vxn, _mm256_loadu_ps(cn + j)), _mm256_mul_ps(two, _mm256_loadu_ps(dots + j)));
    const __m256 lt = _mm256_cmp_ps(dd, vmin, _CMP_LT_OQ);
    vmin = _mm256_blendv_ps(vmin, dd, lt);
    vidx = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(vidx), _mm256_castsi256_ps(idx), lt));
  }
  float lane_min[8];
  int32_t lane_idx[8];
  _mm256_storeu_ps(lane_min, vmin);
  _mm256_storeu_si256((__m256i*)lane_idx, vidx);
  float b = INFINITY;
  int32_t a = INT32_MAX;
  for (int l = 0; l < 8; ++l)
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

enum { MR = 6, NR = 16 };

static void gemm_ukr_avx2(int64_t kc, const float* ap, const float* bp, float* c, int64_t ldc, float alpha, int m,
                          int n) {
  __m256 acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t p = 0; p < kc; ++p, ap += MR, bp += NR) {
    const __m256 b0 = _mm256_load_ps(bp), b1 = _mm256_load_ps(bp + 8);
    for (int i = 0; i < MR; ++i) {
      const __m256 a = _mm256_broadcast_ss(ap + i);
      acc[i][0] = _mm256_fmadd_ps(a, b0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(a, b1, acc[i][1]);
    }
  }
  const __m256 va = _mm256_set1_ps(alpha);
  if (m == MR && n == NR) {
    for (int i = 0; i < MR; ++i) {
      float* row = c + i * ldc;
      _mm256_storeu_ps(row, _mm256_fmadd_ps(va, acc[i][0], _mm256_loadu_ps(row)));
      _mm256_storeu_ps(row + 8, _mm256_fmadd_ps(va, acc[i][1], _mm256_loadu_ps(row + 8)));
    }
    return;
  }
  float tile[MR][NR];
  for (int i = 0; i < MR; ++i) {
    _mm256_storeu_ps(tile[i], _mm256_mul_ps(va, acc[i][0]));
    _mm256_storeu_ps(tile[i] + 8, _mm256_mul_ps(va, acc[i][1]));
  }
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) c[i * ldc + j] += tile[i][j];
}

/* Block b of 64 packed bytes in two 32-byte halves; field t of each byte meets x[b*256 + t*64 + h*32 ...]. */
static void ternary_dot_avx2(const int8_t* x, int rows, int64_t x_stride, const uint8_t* w, int64_t nbytes, int64_t* acc) {
  uint8_t last[64];
  const int64_t full = hybrit_ternary_whole_blocks(w, nbytes, last), blocks = (nbytes + 63) / 64;
  const __m256i three = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
  __m256i a[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
  for (int i = 0; i < rows; ++i) acc[i] = 0;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    for (int h = 0; h < 2; ++h) {
      const __m256i p = _mm256_loadu_si256((const __m256i*)((blk < full ? w + blk * 64 : last) + h * 32));
      const __m256i c0 = _mm256_and_si256(p, three), c1 = _mm256_and_si256(_mm256_srli_epi16(p, 2), three);
      const __m256i c2 = _mm256_and_si256(_mm256_srli_epi16(p, 4), three), c3 = _mm256_and_si256(_mm256_srli_epi16(p, 6), three);
      for (int i = 0; i < rows; ++i) {
        const int8_t* xb = x + i * x_stride + blk * 256 + h * 32;
        /* u8 codes <= 2 times s8: a pair sums to at most 512, four of them to 2048: no int16 saturation. */
        __m256i s = _mm256_maddubs_epi16(c0, _mm256_loadu_si256((const __m256i*)xb));
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(c1, _mm256_loadu_si256((const __m256i*)(xb + 64))));
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(c2, _mm256_loadu_si256((const __m256i*)(xb + 128))));
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(c3, _mm256_loadu_si256((const __m256i*)(xb + 192))));
        a[i] = _mm256_add_epi32(a[i], _mm256_madd_epi16(s, ones));
      }
    }
    if ((blk & 4095) == 4095 || blk + 1 == blocks) {  /* at most 8192 per lane per block: flush long before 2^31 */
      for (int i = 0; i < rows; ++i) {
        int32_t lanes[8];
        _mm256_storeu_si256((__m256i*)lanes, a[i]);
        for (int l = 0; l < 8; ++l) acc[i] += lanes[l];
        a[i] = _mm256_setzero_si256();
      }
    }
  }
}

static void exp_avx2(const float* x, float* y, int64_t n) { hybrit_exp_poly(x, y, n); }

static const hybrit_c_kernels avx2_kernels = {
    HYBRIT_ISA_AVX2, chunk_abs_sums_avx2, ternary_pass_avx2, absmax_avx2, int8_pass_avx2, argmin_update_avx2, MR, NR, 144, 256,
    2048, gemm_ukr_avx2, ternary_dot_avx2, exp_avx2, NULL};

const hybrit_c_kernels* hybrit_c_kernels_avx2(void) { return &avx2_kernels; }
