// Step 2 of the eval forward: the 3x3 and 5x5 convs over the reduce maps.
//
// Implicit GEMM: for output pixel (h, w) the K x K window of a zero-bordered NHWC map
// is K runs of K * C contiguous elements (one per kernel row, a padded row apart),
// which is exactly the packed weights' row order (tap * C + c). So the GEMM's A rows
// are pointers to window corners and no im2col matrix is ever built; bias + ReLU run
// in the epilogue and results go straight into the branch's output slice.
// 3x3 branches take the Winograd path instead (winograd.cpp): fewer flops.
#include <omp.h>

#include <algorithm>
#include <vector>

#include "inception_cpu.h"

namespace inception_cpu {

template <typename T>
void spatial_step(const Shape& shape, const SpatialBranch<T>& branch3,
                  const SpatialBranch<T>& branch5) {
  // Both branches' work in one parallel region: (pixel block or Winograd tile block)
  // x column chunk.
  struct Task {
    const SpatialBranch<T>* branch;
    int64_t first;  // first pixel (implicit GEMM) or tile (Winograd) of the block
    int64_t begin, end;
  };
  const int64_t tiles = shape.batch * ceil_div(shape.height, 2) * ceil_div(shape.width, 2);
  std::vector<Task> tasks;
  int64_t winograd_channels = 0;
  for (const SpatialBranch<T>* br : {&branch3, &branch5}) {
    const int64_t step = br->winograd ? kWinogradTiles : kBlockRows;
    const int64_t count = br->winograd ? tiles : shape.pixels();
    if (br->winograd) winograd_channels = std::max(winograd_channels, br->input.channels);
    for (int64_t first = 0; first < count; first += step)
      for (int64_t j = 0; j < br->weights.cols; j += chunk_cols<T>())
        tasks.push_back({br, first, j, std::min(br->weights.cols, j + chunk_cols<T>())});
  }
  const int64_t buffer_size =
      winograd_channels ? 16 * kWinogradTiles * (winograd_channels + chunk_cols<T>()) : 0;
  std::vector<T> buffers(at::get_num_threads() * buffer_size);

  parallel_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t index) {
    const Task& task = tasks[index];
    const SpatialBranch<T>& br = *task.branch;
    if (br.winograd) {
      winograd_tile_block(shape, br, task.first, task.begin, task.end,
                          buffers.data() + omp_get_thread_num() * buffer_size);
      return;
    }
    const int64_t rows = std::min(kBlockRows, shape.pixels() - task.first);
    const T* a_rows[kBlockRows];
    T* c_rows[kBlockRows];
    for_each_pixel(shape, task.first, rows,
                   [&](int64_t i, int64_t n, int64_t h, int64_t w) {
                     a_rows[i] = br.input.window(n, h, w);
                     c_rows[i] = br.out.data + (task.first + i) * br.out.row_stride;
                   });
    const KLayout taps{br.kernel, br.kernel * br.input.channels,
                       br.input.width * br.input.channels};
    gemm(rows, a_rows, taps, br.weights.w, br.weights.ldb, br.weights.bias, c_rows,
         task.begin, task.end);
  });
}

template void spatial_step<float>(const Shape&, const SpatialBranch<float>&,
                                  const SpatialBranch<float>&);
template void spatial_step<double>(const Shape&, const SpatialBranch<double>&,
                                   const SpatialBranch<double>&);

}  // namespace inception_cpu
