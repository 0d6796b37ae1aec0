/* The plain-C backend: single thread, a scalar reference plus AVX2 and AVX-512 variants of the
 * inner kernels, one of which is selected at run time (never by compiler flags alone) and passed
 * to each entry point as its kernel table.
 *
 * Numerical contract shared by every backend (see backends/README.md):
 *  - rounding is round-half-to-even (IEEE default; rintf, _mm*_round_ps, CUDA rintf);
 *  - sum |w| for the ternary scale is accumulated in double in a canonical order: chunks of
 *    HYBRIT_SUM_CHUNK elements, within a chunk element i goes to lane i % HYBRIT_SUM_LANES, the
 *    lanes are folded by halving (v[i] += v[i + h], h = 8, 4, 2, 1), and the chunk sums are folded
 *    by hybrit_c_fold_sums. Any order that reproduces this gives the same bits.
 */
#ifndef HYBRIT_C_H
#define HYBRIT_C_H

#include <stdint.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

#define HYBRIT_SUM_CHUNK 4096
#define HYBRIT_SUM_LANES 16

/* Return codes. */
#define HYBRIT_C_OK 0
#define HYBRIT_C_NONFINITE (-1) /* a NaN or Inf in the input; *bad_index says where */
#define HYBRIT_C_BADVALUE (-2)  /* a value outside its domain (label, ternary code); *bad_index */
#define HYBRIT_C_NOMEM (-3)

typedef enum { HYBRIT_ISA_SCALAR = 0, HYBRIT_ISA_AVX2 = 1, HYBRIT_ISA_AVX512 = 2 } hybrit_isa;

/* The kernels that differ per ISA. */
typedef struct {
  hybrit_isa isa;
  /* Canonical |x| sums of each chunk of x (n elements): out has ceil(n / HYBRIT_SUM_CHUNK) slots. */
  void (*chunk_abs_sums)(const float* x, int64_t n, double* out);
  /* q[i] = clamp(rint(w[i] / s), -1, 1). t = hybrit_c_ternary_threshold(s) is the smallest
   * positive w with rint(w / s) >= 1, so the formula is exactly q = (w >= t) - (w <= -t): the
   * SIMD variants compare instead of dividing; the scalar reference divides. */
  void (*ternary_pass)(const float* w, int64_t n, float s, float t, int8_t* q);
  /* max |x| over n values; *finite = 0 if any value is NaN or Inf. */
  float (*absmax)(const float* x, int64_t n, int* finite);
  /* q[i] = clamp(rint(x[i] * s), -128, 127). */
  void (*int8_pass)(const float* x, int64_t n, float s, int8_t* q);
  /* One point against n centroids: dd[j] = (xn + cn[j]) - 2 * dots[j] (no FMA); where dd[j] < *best
   * (strict, scanning j upward: the first of equals wins), *best = dd[j] and *arg = base + j. */
  void (*argmin_update)(const float* dots, const float* cn, float xn, int64_t n, int32_t base, float* best, int32_t* arg);
  /* GEMM micro-kernel: C[m x n] += alpha * Ap * Bp, Ap packed MR-tall, Bp packed NR-wide. */
  int mr, nr, mc, kc, nc;
  void (*gemm_ukr)(int64_t kc, const float* ap, const float* bp, float* c, int64_t ldc, float alpha, int m, int n);
  /* Ternary dot products of one packed weight row (nbytes bytes, codes q + 1) with `rows` (1 to 4)
   * activation rows in block order (see hybrit_c_ternary_prepare), x_stride bytes apart:
   * acc[i] = sum_j code_j * x_i[j]. Integer-exact, so every ISA gives the same values. */
  void (*ternary_dot)(const int8_t* x, int rows, int64_t x_stride, const uint8_t* w, int64_t nbytes, int64_t* acc);
  /* y[i] = exp(x[i]) (in place when y == x); x < -87.3 gives 0. The scalar reference calls expf;
   * the SIMD variants run a polynomial (core/vexp.h) within 2 ulp of it. */
  void (*exp_n)(const float* x, float* y, int64_t n);
  /* Four packed weight rows at once (w_stride bytes apart, nbytes each) against `rows` (1 to 4)
   * activation rows: acc[i * 4 + r] = sum_j code_rj * x_i[j]. Each weight block is loaded once for
   * all the activation rows and each activation block once for all four weight rows. NULL where an
   * ISA has none: the caller runs ternary_dot per weight row (the same integers either way). */
  void (*ternary_dot4w)(const int8_t* x, int rows, int64_t x_stride, const uint8_t* w, int64_t w_stride, int64_t nbytes, int64_t* acc);
} hybrit_c_kernels;

/* Kernel table of a given ISA. Calling an ISA the CPU lacks is the caller's mistake: the C++
 * side only selects what the hardware probe reports. */
const hybrit_c_kernels* hybrit_c_kernels_for(hybrit_isa isa);
/* The AVX-512 table with (vnni = 1) or without (vnni = 0) the VNNI ternary dot; NULL for VNNI on a
 * CPU without it. hybrit_c_kernels_for picks VNNI whenever the CPU has it, so tests ask here to
 * run the AVX-512BW kernel too. Call only where AVX-512 runs. */
const hybrit_c_kernels* hybrit_c_kernels_avx512_variant(int vnni);

/* In-place fold of m chunk sums: for (s = 1; s < m; s *= 2) a[i] += a[i + s] for i = 0, 2s, ...
 * Returns a[0] (0 when m == 0). */
double hybrit_c_fold_sums(double* a, int64_t m);
int64_t hybrit_c_first_nonfinite(const float* x, int64_t n);
float hybrit_c_ternary_threshold(float s);
/* The ternary scale from the canonical |w| sum of n elements: max(sum / n, 1e-5) in float. */
float hybrit_c_ternary_scale(double abs_sum, int64_t n);

/* BitNet b1.58 absmean: s = max(mean|w|, 1e-5); q = clamp(rint(w / s), -1, 1). */
int hybrit_c_quantize_ternary(const hybrit_c_kernels* kr, const float* w, int64_t n, int8_t* q, float* scale, int64_t* bad_index);
/* absmax per row: s = 127 / max(max|x|, 1e-5); q = clamp(rint(x * s), -128, 127). */
int hybrit_c_quantize_int8_rows(const hybrit_c_kernels* kr, const float* x, int64_t rows, int64_t cols, int8_t* q, float* scales, int64_t* bad_index);
/* Row by row, 4 weights per byte, weight j of a row in bits 2*(j%4) of byte j/4, as the code q + 1:
 * -1 -> 0b00, 0 -> 0b01, +1 -> 0b10 (0b11 is invalid). Unsigned codes let a later int8 kernel
 * compute sum((q + 1) * x) - sum(x) with u8 x s8 dot products. Padding slots hold 0b01 (zero). */
int hybrit_c_pack_ternary(const int8_t* q, int64_t rows, int64_t cols, uint8_t* packed, int64_t* bad_index);
int hybrit_c_unpack_ternary(const uint8_t* packed, int64_t rows, int64_t cols, int8_t* q, int64_t* bad_index);
static inline int64_t hybrit_packed_cols(int64_t cols) { return (cols + 3) / 4; }

/* Ternary matmul, y (m x n) = (xq (m x k, int8) . W^T) * (w_scale / x_scales[i]), W (n x k) packed
 * as hybrit_c_pack_ternary makes it. Activations are first put in block order: blocks of
 * HYBRIT_TERNARY_BLOCK weights (64 packed bytes); within a block, x[4b + t] goes to t * 64 + b,
 * so the t-th 2-bit field of 64 consecutive packed bytes meets 64 consecutive activations. Rows
 * are padded with zeros to a whole block (k_padded), so padding codes add nothing. The dot of
 * codes (q + 1) is corrected by the row sum of x: sum(q x) = sum((q + 1) x) - sum(x). The
 * scale is applied in f64 as dot * (w_scale / x_scale), the factor computed once per row (every
 * backend, CUDA included, rounds the same way, so all give the same bits).
 * Accumulators: int32 inside the SIMD kernels, flushed to int64 every 4096 blocks (1M weights),
 * so no row length overflows them. */
#define HYBRIT_TERNARY_BLOCK 256
static inline int64_t hybrit_ternary_padded(int64_t k) { return (k + HYBRIT_TERNARY_BLOCK - 1) / HYBRIT_TERNARY_BLOCK * HYBRIT_TERNARY_BLOCK; }
/* xq (m x k) -> x_blocked (m x k_padded) and x_sums (m). */
void hybrit_c_ternary_prepare(const int8_t* xq, int64_t m, int64_t k, int8_t* x_blocked, int64_t* x_sums);
/* Output columns [n_begin, n_end) of y (row stride ldy). */
void hybrit_c_ternary_rows(const hybrit_c_kernels* kr, const int8_t* x_blocked, const int64_t* x_sums, const float* x_scales, int64_t m,
                           int64_t k, const uint8_t* w, float w_scale, int64_t n_begin, int64_t n_end, float* y, int64_t ldy);
/* For the SIMD kernels, which read whole 64-byte blocks: copies a row's partial last block into
 * `last`, zero-padded, and returns the number of whole blocks. Code 0 in the padding meets zero
 * activations (x is padded to whole blocks), so it adds nothing and no scalar tail is needed. */
static inline int64_t hybrit_ternary_whole_blocks(const uint8_t* w, int64_t nbytes, uint8_t last[64]) {
  const int64_t whole = nbytes / 64;
  memset(last, 0, 64);
  if (nbytes > whole * 64) memcpy(last, w + whole * 64, (size_t)(nbytes - whole * 64));
  return whole;
}
int hybrit_c_matmul_ternary(const hybrit_c_kernels* kr, const int8_t* xq, const float* x_scales, int64_t m, int64_t k, const uint8_t* w,
                            int64_t n, float w_scale, float* y);

/* AMX-INT8 (ops_amx.c). Usable when the CPU has AMX-TILE and AMX-INT8 and Linux granted the tile
 * state (checked once) and hybrit_c_set_amx has not turned it off (tests compare both paths).
 * matmul_ternary takes it for at least HYBRIT_AMX_MIN_ROWS activation rows with the AVX-512 table:
 * below that, VNNI's decode in registers costs as little (measured on a Xeon with AMX, 2 threads, at
 * the shapes of a 595M model: equal at 8 rows, AMX 1.4-1.6x faster at 16 and 2-2.8x at 512). */
#define HYBRIT_AMX_MIN_ROWS 12
int hybrit_c_amx_usable(void);
void hybrit_c_set_amx(int enabled);
/* Whether matmul_ternary with table kr runs m activation rows on AMX tiles (both backends ask). */
int hybrit_c_ternary_uses_amx(const hybrit_c_kernels* kr, int64_t m);
/* Bytes of the activations in AMX layout: ceil(m / 16) tiles of 16 rows (missing rows zero), each
 * as padded(k) / 64 B tiles of 1 KiB: byte g * 64 + i * 4 + e of chunk kk is row i's blocked
 * activation kk * 64 + 4 g + e. */
int64_t hybrit_ternary_amx_bytes(int64_t m, int64_t k);
/* Activation tiles [tile_begin, tile_end) of x_blocked (from hybrit_c_ternary_prepare) into x_amx. */
void hybrit_c_ternary_amx_layout(const int8_t* x_blocked, int64_t m, int64_t k, int8_t* x_amx, int64_t tile_begin, int64_t tile_end);
/* hybrit_c_ternary_rows on AMX tiles: weight rows [n_begin, n_end) in panels of 32 against every
 * activation row, the same bits. HYBRIT_C_NOMEM if its panel buffer cannot be allocated. */
int hybrit_c_ternary_rows_amx(const int8_t* x_amx, const int64_t* x_sums, const float* x_scales, int64_t m, int64_t k, const uint8_t* w,
                              float w_scale, int64_t n_begin, int64_t n_end, float* y, int64_t ldy);

/* Row-major C[M x N] = alpha * op(A) * op(B) + beta * C; op(A) is M x K. With beta == 0, C is not
 * read (a NaN there does not leak), as in BLAS. */
int hybrit_c_sgemm(const hybrit_c_kernels* kr, int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                   int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
/* The inner loops of that product, for a kernel that multiplies the same operands many times (the
 * tiles of attention), on operands already packed by gemm_pack.h: op(A) (M x K) in MR-tall panels
 * (panel i at ap + i * mr * K), op(B) (K x N) in NR-wide panels (panel j at bp + j * nr * K, row p
 * of it at + p * nr). C (M x N, row stride ldc) += alpha * op(A) op(B) from panels a_stride and
 * b_stride floats apart. A K-range [p0, p0 + k) of packed B panels starts at bp + p0 * nr, with
 * the panels' stride unchanged; a row range of packed A starting at a multiple of mr at
 * ap + (i0 / mr) * mr * K. */
static inline int64_t hybrit_c_packed_a_floats(const hybrit_c_kernels* kr, int64_t M, int64_t K) { return (M + kr->mr - 1) / kr->mr * kr->mr * K; }
static inline int64_t hybrit_c_packed_b_floats(const hybrit_c_kernels* kr, int64_t K, int64_t N) { return (N + kr->nr - 1) / kr->nr * kr->nr * K; }
void hybrit_c_gemm_packed(const hybrit_c_kernels* kr, int64_t M, int64_t N, int64_t K, float alpha, const float* ap, int64_t a_stride,
                          const float* bp, int64_t b_stride, float* C, int64_t ldc);

/* ---------------- causal attention (attention.c) ----------------
 * Grouped-query causal softmax attention, tiled with an online softmax (FlashAttention-2): no
 * (T x T) probability matrix is ever stored, only the log-sum-exp of each query row, and the
 * backward recomputes each tile's probabilities from it. Layout, row-major:
 *   q, out, dq, dout: (batch * seq, heads * head_dim), head h in columns [h * head_dim, ...);
 *   k, v, dk, dv:     (batch * seq, kv_heads * head_dim); query head h reads kv head
 *                     h / (heads / kv_heads);
 *   lse:              (batch, heads, seq).
 * Scores are scale * q . k, key s visible to query t when s <= t. Work is split into units, one
 * (sequence, query head) for the forward, one (sequence, kv head) for the backward (the unit
 * alone writes its dk and dv rows and the dq rows of its heads), and the tiles inside a unit are
 * visited in a fixed order, so any split of the units over threads gives the same bits. */
#define HYBRIT_ATTENTION_TILE 96 /* query and key rows per tile: a multiple of every micro-kernel's mr and nr */
typedef struct {
  int64_t batch, seq, heads, kv_heads, head_dim;
  float scale;
} hybrit_attention_shape;
/* Floats of scratch one thread needs (for either direction). */
int64_t hybrit_c_attention_workspace(const hybrit_c_kernels* kr, const hybrit_attention_shape* s);
/* Units [u0, u1) of batch * heads. */
void hybrit_c_attention_forward(const hybrit_c_kernels* kr, const hybrit_attention_shape* s, const float* q, const float* k, const float* v,
                                float* out, float* lse, int64_t u0, int64_t u1, float* workspace);
/* Units [u0, u1) of batch * kv_heads; dq, dk, dv are overwritten. */
void hybrit_c_attention_backward(const hybrit_c_kernels* kr, const hybrit_attention_shape* s, const float* q, const float* k, const float* v,
                                 const float* out, const float* dout, const float* lse, float* dq, float* dk, float* dv, int64_t u0,
                                 int64_t u1, float* workspace);
/* Every unit on one thread, scratch allocated here. */
int hybrit_c_attention_forward_all(const hybrit_c_kernels* kr, const hybrit_attention_shape* s, const float* q, const float* k,
                                   const float* v, float* out, float* lse);
int hybrit_c_attention_backward_all(const hybrit_c_kernels* kr, const hybrit_attention_shape* s, const float* q, const float* k,
                                    const float* v, const float* out, const float* dout, const float* lse, float* dq, float* dk, float* dv);

/* Nearest centroid (squared Euclidean, GEMM form |x|^2 - 2 x.c + |c|^2, clamped at 0); ties go to
 * the lowest index. bad_index: the first point (or -1 - centroid) with a non-finite norm. */
int hybrit_c_kmeans_assign(const hybrit_c_kernels* kr, const float* X, int64_t n, int64_t d, const float* C, int64_t k, int32_t* labels,
                           float* dist, int64_t* bad_index);
/* Per-cluster sums (double, in point order) and counts; labels must lie in [0, k). */
int hybrit_c_kmeans_update(const float* X, int64_t n, int64_t d, const int32_t* labels, int64_t k, double* sums,
                           int64_t* counts, int64_t* bad_index);

#ifdef __cplusplus
}
/* From the op table's AttentionShape (backends/backend.hpp), which has the same fields. */
template <class Shape>
inline hybrit_attention_shape c_attention_shape(const Shape& s) {
  return hybrit_attention_shape{s.batch, s.seq, s.heads, s.kv_heads, s.head_dim, s.scale};
}
#endif
#endif
