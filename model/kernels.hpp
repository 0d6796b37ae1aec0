// The model's loops between the ops of the op table: RMSNorm, RoPE, the FFN activations, the
// BitLinear fake-quantization, the cross-entropy and the embedding, written once as kernels over a
// range of rows or elements, and run through Dispatcher::parallel_for (the tbb backend's arena, so
// HYBRIT_THREADS bounds them, or in order on the calling thread when the c backend is forced).
// Every kernel writes only the rows or elements of its range, and reductions across rows (the
// norm gains' and the embedding's gradients) split by columns and add rows in order, so results
// are the same bits on any thread count. The training model and the inference model call the
// same kernels, so both compute the same numbers.
#pragma once
#include <cmath>
#include <cstdint>
#include <vector>

#include "dispatch/dispatcher.hpp"

namespace hybrit::kernels {

// Rows per piece for a row kernel over rows of `width` values: about 16K values a piece, fixed by
// the shape alone (never by the thread count).
inline int64_t row_grain(int64_t width) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)); }
inline constexpr int64_t kElementGrain = 1 << 15;

// y = x * g / sqrt(mean(x^2) + eps) for rows [r0, r1) of d values; rinv (or nullptr) keeps
// 1 / sqrt(...) per row. The sum of squares runs in double.
void rmsnorm_rows(const float* x, const float* g, float* y, float* rinv, int64_t r0, int64_t r1, int64_t d, double eps);
// dx = rinv (dy g) - x rinv^3 mean(dy g x) (+ residual, when not nullptr), rows [r0, r1).
void rmsnorm_backward_rows(const float* dy, const float* x, const float* g, const float* rinv, const float* residual, float* dx, int64_t r0,
                           int64_t r1, int64_t d);
// dg[j] += sum over rows r of dy[r][j] x[r][j] rinv[r], for columns [j0, j1), rows in order.
void rmsnorm_gain_grad_cols(const float* dy, const float* x, const float* rinv, float* dg, int64_t n, int64_t d, int64_t j0, int64_t j1);

// RoPE on rows [r0, r1) of (rows, heads * hd) values, half-split pairs (i, i + hd/2) as in HF
// Llama; row r is position r % seq. sign = -1 applies the inverse rotation (the backward).
void rope_rows(float* x, int64_t r0, int64_t r1, int64_t heads, int64_t hd, int64_t seq, const float* cos_t, const float* sin_t, float sign);

// silu(g) = g * sigmoid(g), the exponential by the vectorizable polynomial of core/vexp.h
// (within 2 ulp of expf; training and inference use these same functions).
float silu(float g);
// f = silu(gate) * up over [i0, i1).
void swiglu(const float* gate, const float* up, float* f, int64_t i0, int64_t i1);
// From df: dgate and dup over [i0, i1).
void swiglu_backward(const float* gate, const float* up, const float* df, float* dgate, float* dup, int64_t i0, int64_t i1);
// f = max(up, 0)^2; dup = 2 up df where up > 0.
void relu2(const float* up, float* f, int64_t i0, int64_t i1);
void relu2_backward(const float* up, const float* df, float* dup, int64_t i0, int64_t i1);

// out[i] = q[i] * s over [i0, i1): the dequantized ternary weights.
void dequantize_ternary(const int8_t* q, float s, float* out, int64_t i0, int64_t i1);
// out = q / scale per row, rows [r0, r1) of `cols`: the dequantized int8 activations.
void dequantize_int8_rows(const int8_t* q, const float* scales, float* out, int64_t r0, int64_t r1, int64_t cols);

// Cross-entropy of rows [r0, r1) of logits (v wide): lse[r] = log sum exp(logits[r]) and
// loss[r] = lse[r] - logits[r][target[r]], both in double.
void cross_entropy_rows(const float* logits, const int32_t* targets, double* lse, double* loss, int64_t r0, int64_t r1, int64_t v);
// dlogits[r] = (softmax(logits[r]) - onehot(target[r])) * inv_n, from the forward's lse, without
// a stored probability matrix.
void cross_entropy_backward_rows(const float* logits, const int32_t* targets, const double* lse, float inv_n, float* dlogits, int64_t r0,
                                 int64_t r1, int64_t v);

// Decode attention (the inference forward's), one KV block of kAttentionBlock positions at a time.
// `heads` query rows of hd values, contiguous in q, against the block's keys stored transposed
// (key c of slot j at keys_t[c * kAttentionBlock + j]): scores[h * n + j] = scale * (q_h . k_j)
// for j < n, each dot summed over c in order.
inline constexpr int64_t kAttentionBlock = 16;
void attention_block_scores(const float* q, int64_t heads, const float* keys_t, int64_t n, int64_t hd, float scale, float* scores);
// out_h (hd values, contiguous over h) += sum over j in order of p[h * n + j] v_j (value j at
// values + j * stride).
void attention_block_values(const float* p, int64_t heads, const float* values, int64_t stride, int64_t n, int64_t hd, float* out);
// y = exp(x) over n values (core/vexp.h's polynomial).
void exp_values(const float* x, float* y, int64_t n);

// x[r] = table[tokens[r]] for rows [r0, r1) of d values.
void embedding_rows(const float* table, const int32_t* tokens, float* x, int64_t r0, int64_t r1, int64_t d);
// dtable[tokens[r]][j] += dx[r][j] for all n rows, in row order, columns [j0, j1).
void embedding_grad_cols(const float* dx, const int32_t* tokens, float* dtable, int64_t n, int64_t d, int64_t j0, int64_t j1);

// Runs a row kernel over [0, n) rows of `width` values on the dispatcher's arena.
template <class Body>
void for_rows(Dispatcher& d, int64_t n, int64_t width, const Body& body) {
  d.parallel_for(n, row_grain(width), body);
}
template <class Body>
void for_elements(Dispatcher& d, int64_t n, const Body& body) {
  d.parallel_for(n, kElementGrain, body);
}
// Column slices for the reductions over rows: 64 columns (whole cache lines) a piece.
template <class Body>
void for_columns(Dispatcher& d, int64_t cols, const Body& body) {
  d.parallel_for(cols, 64, body);
}

}  // namespace hybrit::kernels
