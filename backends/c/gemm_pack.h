/* Packing for the GEMM micro-kernels (kr->gemm_ukr): op(A) into MR-tall panels, op(B) into
 * NR-wide panels, zero-padded to whole panels. Static inline, so each file that includes it
 * (ops.c, and attention.c once per ISA) compiles it with its own instruction set. Whichever way a
 * matrix is stored, the loops read it along its rows (contiguously) and scatter into the small
 * panel, which stays in L1. */
#ifndef HYBRIT_GEMM_PACK_H
#define HYBRIT_GEMM_PACK_H
#include <stdint.h>

/* op(A) rows [i0, i0 + mc), columns [p0, p0 + kc): panel of row block ir at out + ir * kc. */
static inline void hybrit_pack_a(int trans, const float* A, int64_t lda, int64_t i0, int64_t p0, int64_t mc, int64_t kc, int mr, float* out) {
  for (int64_t ir = 0; ir < mc; ir += mr, out += mr * kc) {
    const int64_t m = mc - ir < mr ? mc - ir : mr;
    if (!trans) {  /* A stored (M x K): row i of the panel is row i0 + ir + i of A */
      for (int64_t i = 0; i < m; ++i) {
        const float* src = A + (i0 + ir + i) * lda + p0;
        for (int64_t p = 0; p < kc; ++p) out[p * mr + i] = src[p];
      }
    } else {  /* A stored (K x M): row p of A holds the panel's column p */
      for (int64_t p = 0; p < kc; ++p) {
        const float* src = A + (p0 + p) * lda + i0 + ir;
        for (int64_t i = 0; i < m; ++i) out[p * mr + i] = src[i];
      }
    }
    for (int64_t p = 0; p < kc; ++p)
      for (int64_t i = m; i < mr; ++i) out[p * mr + i] = 0.0f;
  }
}

/* op(B) rows [p0, p0 + kc), columns [j0, j0 + nc): panel of column block jr at out + jr * kc. */
static inline void hybrit_pack_b(int trans, const float* B, int64_t ldb, int64_t p0, int64_t j0, int64_t kc, int64_t nc, int nr, float* out) {
  for (int64_t jr = 0; jr < nc; jr += nr, out += nr * kc) {
    const int64_t n = nc - jr < nr ? nc - jr : nr;
    if (!trans) {  /* B stored (K x N) */
      for (int64_t p = 0; p < kc; ++p) {
        const float* src = B + (p0 + p) * ldb + j0 + jr;
        for (int64_t j = 0; j < n; ++j) out[p * nr + j] = src[j];
      }
    } else {  /* B stored (N x K): row j of B is the panel's column j */
      for (int64_t j = 0; j < n; ++j) {
        const float* src = B + (j0 + jr + j) * ldb + p0;
        for (int64_t p = 0; p < kc; ++p) out[p * nr + j] = src[p];
      }
    }
    for (int64_t p = 0; p < kc; ++p)
      for (int64_t j = n; j < nr; ++j) out[p * nr + j] = 0.0f;
  }
}
#endif
