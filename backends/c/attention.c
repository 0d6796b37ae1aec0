/* Causal grouped-query attention, FlashAttention-2 style (see hybrit_c.h for the layout and the
 * determinism contract). Every score and value product is a small GEMM on the kernel table's
 * micro-kernel, every exponential goes through kr->exp_n, so the scalar table gives the
 * reference and the AVX2 / AVX-512 tables the fast variants of the same algorithm.
 *
 * Tiles are TILE x TILE and aligned on both axes, so a key tile is either fully visible to a
 * query tile or it is the diagonal tile, where key column c is visible to query row r when c <= r.
 * The operands that every tile reads (a head's q, k, v, dout) are packed into the micro-kernel's
 * panel layout once per unit (gemm_pack.h), so a tile packs only the probabilities
 * it has just computed. */
/* Compiled once per ISA (HYBRIT_ATTENTION_VARIANT = scalar | avx2 | avx512, with that ISA's -m
 * flags, see CMakeLists.txt), so the row loops and the packing vectorize at the width of the
 * kernel table they run with; attention_select.c picks the variant of kr->isa. */
#include <math.h>
#include <string.h>

#include "gemm_pack.h"
#include "hybrit_c.h"

#define HYBRIT_JOIN2(a, b) a##_##b
#define HYBRIT_JOIN(a, b) HYBRIT_JOIN2(a, b)
#define VARIANT(name) HYBRIT_JOIN(name, HYBRIT_ATTENTION_VARIANT)

static void pack_a(const hybrit_c_kernels* kr, int trans, const float* A, int64_t lda, int64_t M, int64_t K, float* out) {
  hybrit_pack_a(trans, A, lda, 0, 0, M, K, kr->mr, out);
}
static void pack_b(const hybrit_c_kernels* kr, int trans, const float* B, int64_t ldb, int64_t K, int64_t N, float* out) {
  hybrit_pack_b(trans, B, ldb, 0, 0, K, N, kr->nr, out);
}

enum { TILE = HYBRIT_ATTENTION_TILE };

static int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
static int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
static int64_t round16(int64_t n) { return (n + 15) / 16 * 16; } /* 64-byte alignment of each piece */

/* Panel sizes: a (T x hd) matrix as A panels, as B with K = T, and transposed as B with K = hd. */
static int64_t as_a(const hybrit_c_kernels* kr, const hybrit_attention_shape* s) { return round16(hybrit_c_packed_a_floats(kr, s->seq, s->head_dim)); }
static int64_t as_b(const hybrit_c_kernels* kr, const hybrit_attention_shape* s) { return round16(hybrit_c_packed_b_floats(kr, s->seq, s->head_dim)); }
static int64_t as_bt(const hybrit_c_kernels* kr, const hybrit_attention_shape* s) { return round16(hybrit_c_packed_b_floats(kr, s->head_dim, s->seq)); }
static int64_t tile_a(const hybrit_c_kernels* kr) { return round16(hybrit_c_packed_a_floats(kr, TILE, TILE)); }

/* Scratch of one thread, carved from one 64-byte aligned buffer. */
typedef struct {
  float *q_a, *q_b, *do_a, *do_b, *k_bt, *k_b, *v_bt, *v_b; /* packed operands of the unit */
  float *s, *dp, *p_a;                                       /* one tile: scores, dP, a packed tile */
  float *acc, *m, *l, *corr, *delta;
} scratch;

int64_t VARIANT(hybrit_c_attention_workspace)(const hybrit_c_kernels* kr, const hybrit_attention_shape* sh) {
  const int64_t tile = round16(TILE * TILE), hd = sh->head_dim;
  return 2 * as_a(kr, sh) + 4 * as_b(kr, sh) + 2 * as_bt(kr, sh) + 2 * tile + tile_a(kr) + round16(TILE * imax(hd, 1)) + 3 * round16(TILE) +
         round16(sh->seq);
}

static scratch carve(const hybrit_c_kernels* kr, const hybrit_attention_shape* sh, float* w) {
  scratch s;
  s.q_a = w, w += as_a(kr, sh);
  s.do_a = w, w += as_a(kr, sh);
  s.q_b = w, w += as_b(kr, sh);
  s.do_b = w, w += as_b(kr, sh);
  s.k_b = w, w += as_b(kr, sh);
  s.k_bt = w, w += as_bt(kr, sh);
  s.v_bt = w, w += as_bt(kr, sh);
  s.v_b = w, w += as_b(kr, sh);
  s.s = w, w += round16(TILE * TILE);
  s.dp = w, w += round16(TILE * TILE);
  s.p_a = w, w += tile_a(kr);
  s.acc = w, w += round16(TILE * imax(sh->head_dim, 1));
  s.m = w, w += round16(TILE);
  s.l = w, w += round16(TILE);
  s.corr = w, w += round16(TILE);
  s.delta = w;
  return s;
}

/* Number of keys of tile j0 (bc wide) that query row i (absolute) sees. */
static int64_t visible(int64_t i, int64_t j0, int64_t bc) { return imin(bc, imax(0, i - j0 + 1)); }

/* Where a tile's rows start in the packed operands (see hybrit_c.h). */
static const float* a_rows(const hybrit_c_kernels* kr, const float* packed, int64_t i0, int64_t K) { return packed + (i0 / kr->mr) * kr->mr * K; }
static const float* b_krange(const hybrit_c_kernels* kr, const float* packed, int64_t p0) { return packed + p0 * kr->nr; }
static const float* bt_cols(const hybrit_c_kernels* kr, const float* packed, int64_t j0, int64_t hd) { return packed + (j0 / kr->nr) * kr->nr * hd; }

/* w->s (br x bc) = scale * Q_i K_j^T, from the unit's packed q (w->q_a) and k^T (w->k_bt). */
static void tile_scores(const hybrit_c_kernels* kr, const hybrit_attention_shape* sh, const scratch* w, int64_t i0, int64_t br, int64_t j0,
                        int64_t bc) {
  const int64_t hd = sh->head_dim;
  memset(w->s, 0, (size_t)(br * bc) * sizeof(float));
  hybrit_c_gemm_packed(kr, br, bc, hd, sh->scale, a_rows(kr, w->q_a, i0, hd), kr->mr * hd, bt_cols(kr, w->k_bt, j0, hd), kr->nr * hd, w->s, bc);
}

void VARIANT(hybrit_c_attention_forward)(const hybrit_c_kernels* kr, const hybrit_attention_shape* sh, const float* q, const float* k, const float* v,
                                float* out, float* lse, int64_t u0, int64_t u1, float* workspace) {
  const int64_t T = sh->seq, H = sh->heads, KV = sh->kv_heads, hd = sh->head_dim, group = H / KV;
  const int64_t ldq = H * hd, ldk = KV * hd, mr = kr->mr, nr = kr->nr;
  scratch w = carve(kr, sh, workspace);
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t b = u / H, h = u % H, g = h / group;
    const float* Q = q + b * T * ldq + h * hd;
    const float* K = k + b * T * ldk + g * hd;
    const float* V = v + b * T * ldk + g * hd;
    float* O = out + b * T * ldq + h * hd;
    float* L = lse + (b * H + h) * T;
    pack_a(kr, 0, Q, ldq, T, hd, w.q_a);
    pack_b(kr, 1, K, ldk, hd, T, w.k_bt); /* K^T: (hd x T) */
    pack_b(kr, 0, V, ldk, T, hd, w.v_b);  /* V: (T x hd) */
    for (int64_t i0 = 0; i0 < T; i0 += TILE) {
      const int64_t br = imin(TILE, T - i0);
      memset(w.acc, 0, (size_t)(br * hd) * sizeof(float));
      for (int64_t r = 0; r < br; ++r) w.m[r] = -INFINITY, w.l[r] = 0.0f;
      for (int64_t j0 = 0; j0 <= i0; j0 += TILE) {
        const int64_t bc = imin(TILE, T - j0);
        tile_scores(kr, sh, &w, i0, br, j0, bc);
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
        pack_a(kr, 0, w.s, bc, br, bc, w.p_a);
        hybrit_c_gemm_packed(kr, br, hd, bc, 1.0f, w.p_a, mr * bc, b_krange(kr, w.v_b, j0), nr * T, w.acc, hd);
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

/* Loops: query head of the group, key tile j, query tile i >= j. For a fixed key tile the dK and
 * dV sums run over (head, query tile) in that order, and each dQ row sums over key tiles in
 * order, so the result is fixed by the shape. */
void VARIANT(hybrit_c_attention_backward)(const hybrit_c_kernels* kr, const hybrit_attention_shape* sh, const float* q, const float* k, const float* v,
                                 const float* out, const float* dout, const float* lse, float* dq, float* dk, float* dv, int64_t u0,
                                 int64_t u1, float* workspace) {
  const int64_t T = sh->seq, H = sh->heads, KV = sh->kv_heads, hd = sh->head_dim, group = H / KV;
  const int64_t ldq = H * hd, ldk = KV * hd, mr = kr->mr, nr = kr->nr;
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
    pack_b(kr, 1, K, ldk, hd, T, w.k_bt); /* K^T for the scores */
    pack_b(kr, 0, K, ldk, T, hd, w.k_b);  /* K for dQ */
    pack_b(kr, 1, V, ldk, hd, T, w.v_bt); /* V^T for dP */
    for (int64_t hl = 0; hl < group; ++hl) {
      const int64_t h = g * group + hl;
      const float* Q = q + b * T * ldq + h * hd;
      const float* O = out + b * T * ldq + h * hd;
      const float* dO = dout + b * T * ldq + h * hd;
      float* dQ = dq + b * T * ldq + h * hd;
      const float* L = lse + (b * H + h) * T;
      /* delta[t] = dout . out over the row: the softmax backward's row term. */
      for (int64_t t = 0; t < T; ++t) {
        const float* o = O + t * ldq;
        const float* d = dO + t * ldq;
        float acc = 0.0f;
        for (int64_t c = 0; c < hd; ++c) acc += o[c] * d[c];
        w.delta[t] = acc;
        memset(dQ + t * ldq, 0, (size_t)hd * sizeof(float));
      }
      pack_a(kr, 0, Q, ldq, T, hd, w.q_a);
      pack_b(kr, 0, Q, ldq, T, hd, w.q_b);
      pack_a(kr, 0, dO, ldq, T, hd, w.do_a);
      pack_b(kr, 0, dO, ldq, T, hd, w.do_b);
      for (int64_t j0 = 0; j0 < T; j0 += TILE) {
        const int64_t bc = imin(TILE, T - j0);
        for (int64_t i0 = j0; i0 < T; i0 += TILE) {
          const int64_t br = imin(TILE, T - i0);
          /* P = exp(S - lse_i), zero where masked */
          tile_scores(kr, sh, &w, i0, br, j0, bc);
          for (int64_t r = 0; r < br; ++r) {
            float* row = w.s + r * bc;
            const int64_t n = visible(i0 + r, j0, bc);
            const float lr = L[i0 + r];
            for (int64_t c = 0; c < n; ++c) row[c] -= lr;
            for (int64_t c = n; c < bc; ++c) row[c] = -INFINITY;
          }
          kr->exp_n(w.s, w.s, br * bc);
          /* dV_j += P^T dO_i */
          pack_a(kr, 1, w.s, bc, bc, br, w.p_a);
          hybrit_c_gemm_packed(kr, bc, hd, br, 1.0f, w.p_a, mr * br, b_krange(kr, w.do_b, i0), nr * T, dV + j0 * ldk, ldk);
          /* dP = dO_i V_j^T; dS = P (dP - delta) scale, into dp */
          memset(w.dp, 0, (size_t)(br * bc) * sizeof(float));
          hybrit_c_gemm_packed(kr, br, bc, hd, 1.0f, a_rows(kr, w.do_a, i0, hd), mr * hd, bt_cols(kr, w.v_bt, j0, hd), nr * hd, w.dp, bc);
          for (int64_t r = 0; r < br; ++r) {
            const float* p = w.s + r * bc;
            float* d = w.dp + r * bc;
            const float dr = w.delta[i0 + r];
            for (int64_t c = 0; c < bc; ++c) d[c] = p[c] * (d[c] - dr) * sh->scale;
          }
          /* dK_j += dS^T Q_i; dQ_i += dS K_j */
          pack_a(kr, 1, w.dp, bc, bc, br, w.p_a);
          hybrit_c_gemm_packed(kr, bc, hd, br, 1.0f, w.p_a, mr * br, b_krange(kr, w.q_b, i0), nr * T, dK + j0 * ldk, ldk);
          pack_a(kr, 0, w.dp, bc, br, bc, w.p_a);
          hybrit_c_gemm_packed(kr, br, hd, bc, 1.0f, w.p_a, mr * bc, b_krange(kr, w.k_b, j0), nr * T, dQ + i0 * ldq, ldq);
        }
      }
    }
  }
}
