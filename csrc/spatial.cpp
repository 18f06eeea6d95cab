// Step 2 of the eval forward: the 3x3 and 5x5 convs as implicit GEMMs.
//
// For output pixel (h, w) the K x K window of a zero-bordered NHWC map is K runs of
// K * C contiguous elements (one per kernel row, a padded row apart), which is exactly
// the packed weights' row order (tap * C + c). So the GEMM's A rows are pointers to
// window corners and no im2col matrix is ever built; bias + ReLU run in the epilogue
// and results go straight into the branch's output slice.
#include <algorithm>
#include <vector>

#include "inception_cpu.h"

namespace inception_cpu {

template <typename T>
void spatial_step(const Shape& shape, const SpatialBranch<T>& branch3,
                  const SpatialBranch<T>& branch5) {
  struct ColumnJob {
    const SpatialBranch<T>* branch;
    int64_t begin, end;
  };
  std::vector<ColumnJob> jobs;
  for (const SpatialBranch<T>* branch : {&branch3, &branch5})
    for (int64_t j = 0; j < branch->weights.cols; j += chunk_cols<T>())
      jobs.push_back({branch, j, std::min(branch->weights.cols, j + chunk_cols<T>())});

  const int64_t pixels = shape.pixels();
  const int64_t n_jobs = static_cast<int64_t>(jobs.size());
  parallel_tasks(ceil_div(pixels, kBlockRows) * n_jobs, [&](int64_t task) {
    const ColumnJob& job = jobs[task % n_jobs];
    const SpatialBranch<T>& br = *job.branch;
    const int64_t m0 = task / n_jobs * kBlockRows;
    const int64_t rows = std::min(kBlockRows, pixels - m0);
    const T* a_rows[kBlockRows];
    T* c_rows[kBlockRows];
    for_each_pixel(shape, m0, rows, [&](int64_t i, int64_t n, int64_t h, int64_t w) {
      a_rows[i] = br.input.window(n, h, w);
      c_rows[i] = br.out.data + (m0 + i) * br.out.row_stride;
    });
    const KLayout taps{br.kernel, br.kernel * br.input.channels,
                       br.input.width * br.input.channels};
    gemm_bias_relu(rows, a_rows, taps, br.weights.w, br.weights.ldb, br.weights.bias,
                   c_rows, job.begin, job.end);
  });
}

template void spatial_step<float>(const Shape&, const SpatialBranch<float>&,
                                  const SpatialBranch<float>&);
template void spatial_step<double>(const Shape&, const SpatialBranch<double>&,
                                   const SpatialBranch<double>&);

}  // namespace inception_cpu
