// Eigen's GEMM compiled for one ISA (HYBRIT_EIGEN_VARIANT = generic | avx2 | avx512, with the
// matching -m flags from CMake). Eigen is header-only: three copies compiled with different flags
// would define the same template instances, and the linker would keep one of them, possibly an
// AVX-512 one on a CPU without it. Renaming the namespace `Eigen` per copy keeps them apart.
// Standard headers come first so the rename cannot reach them.
#include <algorithm>
#include <array>
#include <cassert>
#include <cfloat>
#include <climits>
#include <cmath>
#include <complex>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iosfwd>
#include <iostream>
#include <limits>
#include <new>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#define HYBRIT_JOIN2(a, b) a##_##b
#define HYBRIT_JOIN(a, b) HYBRIT_JOIN2(a, b)
#define Eigen HYBRIT_JOIN(EigenFor, HYBRIT_EIGEN_VARIANT)
#include <Eigen/Core>

namespace hybrit {

// Row-major c = alpha * op(a) * op(b) + beta * c on leading dimensions lda, ldb, ldc.
void HYBRIT_JOIN(eigen_sgemm, HYBRIT_EIGEN_VARIANT)(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha,
                                                     const float* a, int64_t lda, const float* b, int64_t ldb,
                                                     float beta, float* c, int64_t ldc) {
  using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Stride = Eigen::OuterStride<>;
  Eigen::Map<Mat, 0, Stride> C(c, m, n, Stride(ldc));
  if (beta == 0.0f)
    C.setZero();
  else if (beta != 1.0f)
    C *= beta;
  if (k == 0 || alpha == 0.0f || m == 0 || n == 0) return;
  Eigen::Map<const Mat, 0, Stride> A(a, ta ? k : m, ta ? m : k, Stride(lda));
  Eigen::Map<const Mat, 0, Stride> B(b, tb ? n : k, tb ? k : n, Stride(ldb));
  if (!ta && !tb) C.noalias() += alpha * A * B;
  else if (ta && !tb) C.noalias() += alpha * A.transpose() * B;
  else if (!ta && tb) C.noalias() += alpha * A * B.transpose();
  else C.noalias() += alpha * A.transpose() * B.transpose();
}

}  // namespace hybrit
