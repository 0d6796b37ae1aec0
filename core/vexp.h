/* exp(x) for n floats as plain loops that the compiler vectorizes at each ISA file's width
 * (backends/c/ops_avx2.c and ops_avx512.c, training/kernels.cpp include this; C and C++): Cephes' expf, x = k ln2 + r with |r| <= ln2 / 2 and a
 * degree-6 polynomial for exp(r), then 2^k from the exponent bits. Within 2 ulp of expf on
 * [-87.3, 88.3]; below that the result is 0 (what softmax wants of a masked -inf score), above it
 * the value at 88.3 (scores here are shifted by their row maximum, so they are <= 0). */
#ifndef HYBRIT_VEXP_H
#define HYBRIT_VEXP_H
#include <stdint.h>
#include <string.h>

static inline void hybrit_exp_poly(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v0 = x[i];
    const float v = v0 > 88.3f ? 88.3f : (v0 < -87.3f ? -87.3f : v0);
    /* k = round(v / ln2) by the 1.5 * 2^23 trick (exact round-to-nearest, no libm call). */
    const float k = (v * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const float r = (v - k * 0.693359375f) - k * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)k + 127) << 23;
    float two_k;
    memcpy(&two_k, &bits, sizeof two_k);
    y[i] = v0 < -87.3f ? 0.0f : p * two_k;
  }
}
#endif
