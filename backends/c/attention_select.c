/* The public attention entry points: the variant of attention.c compiled for the kernel table's
 * ISA (scalar, AVX2 or AVX-512), and the single-thread drivers that allocate their scratch. */
#define _POSIX_C_SOURCE 200112L /* posix_memalign */
#include <stdlib.h>

#include "hybrit_c.h"

#define DECLARE(v)                                                                                                                      \
  int64_t hybrit_c_attention_workspace_##v(const hybrit_c_kernels*, const hybrit_attention_shape*);                                    \
  void hybrit_c_attention_forward_##v(const hybrit_c_kernels*, const hybrit_attention_shape*, const float*, const float*, const float*, \
                                      float*, float*, int64_t, int64_t, float*);                                                       \
  void hybrit_c_attention_backward_##v(const hybrit_c_kernels*, const hybrit_attention_shape*, const float*, const float*, const float*, \
                                       const float*, const float*, const float*, float*, float*, float*, int64_t, int64_t, float*);
DECLARE(scalar)
DECLARE(avx2)
DECLARE(avx512)

int64_t hybrit_c_attention_workspace(const hybrit_c_kernels* kr, const hybrit_attention_shape* s) {
  switch (kr->isa) {
    case HYBRIT_ISA_AVX512: return hybrit_c_attention_workspace_avx512(kr, s);
    case HYBRIT_ISA_AVX2: return hybrit_c_attention_workspace_avx2(kr, s);
    default: return hybrit_c_attention_workspace_scalar(kr, s);
  }
}

void hybrit_c_attention_forward(const hybrit_c_kernels* kr, const hybrit_attention_shape* s, const float* q, const float* k, const float* v,
                                float* out, float* lse, int64_t u0, int64_t u1, float* workspace) {
  switch (kr->isa) {
    case HYBRIT_ISA_AVX512: hybrit_c_attention_forward_avx512(kr, s, q, k, v, out, lse, u0, u1, workspace); break;
    case HYBRIT_ISA_AVX2: hybrit_c_attention_forward_avx2(kr, s, q, k, v, out, lse, u0, u1, workspace); break;
    default: hybrit_c_attention_forward_scalar(kr, s, q, k, v, out, lse, u0, u1, workspace); break;
  }
}

void hybrit_c_attention_backward(const hybrit_c_kernels* kr, const hybrit_attention_shape* s, const float* q, const float* k, const float* v,
                                 const float* out, const float* dout, const float* lse, float* dq, float* dk, float* dv, int64_t u0,
                                 int64_t u1, float* workspace) {
  switch (kr->isa) {
    case HYBRIT_ISA_AVX512: hybrit_c_attention_backward_avx512(kr, s, q, k, v, out, dout, lse, dq, dk, dv, u0, u1, workspace); break;
    case HYBRIT_ISA_AVX2: hybrit_c_attention_backward_avx2(kr, s, q, k, v, out, dout, lse, dq, dk, dv, u0, u1, workspace); break;
    default: hybrit_c_attention_backward_scalar(kr, s, q, k, v, out, dout, lse, dq, dk, dv, u0, u1, workspace); break;
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
