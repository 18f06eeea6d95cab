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
void redo_nonfinite_border_pixel(const Shape& shape, const SpatialBranch<T>& br,
                                 int64_t n, int64_t h, int64_t w, int64_t col_begin,
                                 int64_t col_end) {
  const int64_t pad = br.input.pad;
  if (h >= pad && h < shape.height - pad && w >= pad && w < shape.width - pad) return;
  T* out = br.out.data + ((n * shape.height + h) * shape.width + w) * br.out.row_stride;
  bool finite = true;
  for (int64_t col = col_begin; col < col_end; ++col)
    finite &= out[col] - out[col] == 0;  // false for inf and NaN
  if (finite) return;
  const int64_t c_in = br.input.channels, k = br.kernel;
  for (int64_t col = col_begin; col < col_end; ++col) {
    T acc = 0;
    for (int64_t ky = std::max(pad - h, int64_t(0));
         ky < std::min(k, shape.height + pad - h); ++ky) {
      for (int64_t kx = std::max(pad - w, int64_t(0));
           kx < std::min(k, shape.width + pad - w); ++kx) {
        const T* a = br.input.window(n, h, w) + (ky * br.input.width + kx) * c_in;
        const T* b = br.weights.w + (ky * k + kx) * c_in * br.weights.ldb + col;
        for (int64_t c = 0; c < c_in; ++c) acc += a[c] * b[c * br.weights.ldb];
      }
    }
    out[col] = relu(acc + br.weights.bias[col]);
  }
}

template <typename T>
void spatial_step(const Shape& shape, const SpatialBranch<T>* branches, int64_t count) {
  // All branches' work in one parallel region: (pixel block or Winograd tile block)
  // x column chunk.
  struct Task {
    const SpatialBranch<T>* branch;
    int64_t first;  // first pixel (implicit GEMM) or tile (Winograd) of the block
    int64_t begin, end;
  };
  const int64_t tiles = shape.batch * ceil_div(shape.height, 2) * ceil_div(shape.width, 2);
  std::vector<Task> tasks;
  int64_t winograd_channels = 0;
  for (const SpatialBranch<T>* br = branches; br != branches + count; ++br) {
    const bool winograd = br->winograd != nullptr;
    const int64_t step = winograd ? kWinogradTiles : kBlockRows;
    const int64_t count = winograd ? tiles : shape.pixels();
    if (winograd) winograd_channels = std::max(winograd_channels, br->input.channels);
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
    gemm(rows, a_rows, br.window_layout(), br.weights.w, br.weights.ldb, br.weights.bias, c_rows,
         task.begin, task.end);
    for_each_pixel(shape, task.first, rows,
                   [&](int64_t, int64_t n, int64_t h, int64_t w) {
                     redo_nonfinite_border_pixel(shape, br, n, h, w, task.begin, task.end);
                   });
  });
}

#define INSTANTIATE(T)                                                               \
  template void redo_nonfinite_border_pixel<T>(const Shape&, const SpatialBranch<T>&, \
                                               int64_t, int64_t, int64_t, int64_t,    \
                                               int64_t);                              \
  template void spatial_step<T>(const Shape&, const SpatialBranch<T>*, int64_t);
INSTANTIATE(float)
INSTANTIATE(double)
#undef INSTANTIATE

}  // namespace inception_cpu
