// The "plain Eigen" baseline of the matmul benchmark: what a user gets by compiling Eigen
// directly with -O3 -march=native -fopenmp (Eigen then parallelizes its GEMM with OpenMP).
#include <Eigen/Core>

void eigen_plain_matmul(const float* a, const float* b, float* c, int n, int threads) {
  using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  Eigen::setNbThreads(threads);
  Eigen::Map<const Mat> A(a, n, n), B(b, n, n);
  Eigen::Map<Mat> C(c, n, n);
  C.noalias() = A * B;
}
