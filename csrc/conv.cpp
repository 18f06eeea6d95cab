// conv_step: the one parallel step every eval forward is made of.
//
// Implicit GEMM: output pixel (h, w)'s kh x kw window inside a zero-bordered NHWC map is
// kh runs of kw * C contiguous elements (one per kernel row, a bordered row apart), the
// packed weights' row order (tap * C + c). So the GEMM's A rows are pointers to window
// corners (a 1x1 conv's: x's pixels) and no im2col matrix is ever built; bias + ReLU
// run in the epilogue and results go straight into the branch's channel slice, or into
// the interior of the zero-bordered map the next step convolves.
// Pool branches take their 3x3/s1/p1 pool of a pixel block into a per-thread buffer
// that stays in cache and multiply that: the pooled map never exists.
// 3x3 stride-1 branches with Winograd weights take winograd.cpp's path (fewer flops)
// where their map has tiles enough (runs_winograd).
#include <omp.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "inception_cpu.h"

namespace inception_cpu {
namespace {

// pooled[i, :] = the pool over the 3x3 window around output pixel m0 + i, clipped to
// the map (padding 1; ceil_mode changes nothing at stride 1). A NaN in a window gives
// NaN, as max_pool2d / avg_pool2d do.
template <typename T>
void pool_tile(const ConvBranch<T>& br, int64_t m0, int64_t rows, T* pooled) {
  const Shape& s = br.in_shape;
  const int64_t c_in = br.input.channels;
  for_each_pixel(s, m0, rows, [&](int64_t i, int64_t n, int64_t h, int64_t w) {
    const int64_t h0 = std::max<int64_t>(h - 1, 0), h1 = std::min(h + 2, s.height);
    const int64_t w0 = std::max<int64_t>(w - 1, 0), w1 = std::min(w + 2, s.width);
    const T count = br.pool == Pool::kAvg ? T(9) : static_cast<T>((h1 - h0) * (w1 - w0));
    pool_window(br.input, n, h0, h1, w0, w1, br.pool == Pool::kMax, T(1) / count,
                pooled + i * c_in);
  });
}

// Tasks a Winograd branch's columns are split into, per thread, at the least.
constexpr int64_t kTasksPerThread = 4;

template <typename T>
bool pads(const ConvBranch<T>& br) {
  return br.pad_h > 0 || br.pad_w > 0;
}

}  // namespace

template <typename T>
void redo_nonfinite_border_pixel(const ConvBranch<T>& br, int64_t n, int64_t h,
                                 int64_t w, int64_t col_begin, int64_t col_end) {
  const int64_t h0 = h * br.stride - br.pad_h, w0 = w * br.stride - br.pad_w;
  const Shape& in = br.in_shape;
  if (h0 >= 0 && h0 + br.kh <= in.height && w0 >= 0 && w0 + br.kw <= in.width) return;
  T* out = br.out.pixel(n, h, w);
  T probe = 0;  // stays 0 while every output is finite (x - x is NaN for inf / NaN)
  for_each_lane_group<T>(col_end - col_begin, [&](auto lanes, int64_t c) {
    using U = decltype(lanes);
    const U v = load<U>(out + col_begin + c);
    probe += lane_sum<T>(v - v);
  });
  if (probe == 0) return;
  const int64_t c_in = br.input.channels, rows = br.kh * br.kw * c_in;
  const T* corner = br.window(n, h, w);
  for (int64_t col = col_begin; col < col_end; ++col) {
    T acc = 0;
    for (int64_t ky = std::max(-h0, int64_t(0)); ky < std::min(br.kh, in.height - h0); ++ky) {
      for (int64_t kx = std::max(-w0, int64_t(0)); kx < std::min(br.kw, in.width - w0);
           ++kx) {
        const T* a = corner + (ky * br.input.width + kx) * c_in;
        const int64_t row = (ky * br.kw + kx) * c_in;
        for (int64_t c = 0; c < c_in; ++c)
          acc += a[c] * packed_at(br.weights.w, rows, br.weights.cols, row + c, col);
      }
    }
    out[col] = relu(acc + br.weights.bias[col]);
  }
}

template <typename T>
void conv_step(const ConvBranch<T>* branches, int64_t count) {
  // Tasks: (pixel block, branch, column chunk), pixel-block-major so the branches that
  // read the same rows of x run while those rows are in cache; a pool branch's columns
  // stay whole so each block pools its tile once. Then Winograd's (tile block, chunk).
  struct Task {
    const ConvBranch<T>* branch;
    int64_t first;  // first pixel (implicit GEMM) or tile (Winograd) of the block
    int64_t begin, end;
    double cost = 0;  // work(), kept for the sort below

    // Multiply-adds, plus one per element the transforms or the pool read.
    double work() const {
      const ConvBranch<T>& br = *branch;
      const double cols = end - begin, c_in = br.input.channels;
      if (runs_winograd(br)) {
        const int64_t m = br.winograd_tile, n2 = (m + 2) * (m + 2);
        const int64_t tiles = block_rows(winograd_tiles(br.out_shape, m), kWinogradTiles,
                                         first / kWinogradTiles);
        return double(tiles * n2) * (c_in * cols + c_in + cols);
      }
      const int64_t rows = block_rows(br.out_shape.pixels(), kBlockRows, first / kBlockRows);
      const double pool = br.pool == Pool::kNone ? 0 : 9 * c_in;
      return double(rows) * (double(br.kh * br.kw) * c_in * cols + pool);
    }
  };
  std::vector<Task> tasks;
  const auto chunks = [&](const ConvBranch<T>* br, int64_t first, bool whole) {
    const int64_t cols = br->weights.cols, step = whole ? cols : chunk_cols<T>();
    for (int64_t j = 0; j < cols; j += step)
      tasks.push_back({br, first, j, std::min(cols, j + step)});
  };
  const ConvBranch<T>* end = branches + count;
  int64_t blocks = 0, pool_channels = 0, winograd_size = 0;
  for (const ConvBranch<T>* br = branches; br != end; ++br) {
    if (runs_winograd(*br)) {
      const int64_t size = winograd_buffer_size<T>(br->winograd_tile, br->input.channels);
      winograd_size = std::max(winograd_size, size);
    } else {
      blocks = std::max(blocks, block_count(br->out_shape.pixels(), kBlockRows));
    }
    if (br->pool != Pool::kNone) pool_channels = std::max(pool_channels, br->input.channels);
  }
  for (int64_t block = 0; block < blocks; ++block)
    for (const ConvBranch<T>* br = branches; br != end; ++br)
      if (!runs_winograd(*br) && block < block_count(br->out_shape.pixels(), kBlockRows))
        chunks(br, block * kBlockRows, br->pool != Pool::kNone);
  // A Winograd task transforms its tiles' inputs once for all its columns: as many
  // columns as still leave every thread kTasksPerThread tasks to balance.
  const int64_t min_tasks = kTasksPerThread * at::get_num_threads();
  for (const ConvBranch<T>* br = branches; br != end; ++br) {
    if (!runs_winograd(*br)) continue;
    const int64_t blocks = block_count(winograd_tiles(br->out_shape, br->winograd_tile),
                                       kWinogradTiles);
    const int64_t n_chunks = ceil_div(br->weights.cols, chunk_cols<T>());
    const int64_t groups = std::min(ceil_div(min_tasks, blocks), n_chunks);
    const auto group_col = [&](int64_t g) {
      return std::min(br->weights.cols, g * n_chunks / groups * chunk_cols<T>());
    };
    for (int64_t block = 0; block < blocks; ++block)
      for (int64_t g = 0; g < groups; ++g)
        tasks.push_back({br, block * kWinogradTiles, group_col(g), group_col(g + 1)});
  }

  // Largest first (stable: equal tasks keep the order above), so the last tasks to
  // finish are short and the threads end the step together: the dynamic schedule's
  // idle tail was 5% of a batch-1 forward with a pool or Winograd task last.
  for (Task& task : tasks) task.cost = task.work();
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const Task& a, const Task& b) { return a.cost > b.cost; });

  const int64_t pool_size = max_block_rows(kBlockRows) * pool_channels;
  const int64_t buffer_size = std::max(pool_size, winograd_size);
  // Scratch, not zeroed: every task writes what it reads.
  const std::unique_ptr<T[]> buffers(new T[at::get_num_threads() * buffer_size]);

  parallel_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t index) {
    const Task& task = tasks[index];
    const ConvBranch<T>& br = *task.branch;
    T* buffer = buffers.get() + omp_get_thread_num() * buffer_size;
    if (runs_winograd(br)) {
      winograd_tile_block(br, task.first, task.begin, task.end, buffer);
      return;
    }
    const int64_t rows =
        block_rows(br.out_shape.pixels(), kBlockRows, task.first / kBlockRows);
    const T* a_rows[max_block_rows(kBlockRows)];
    T* c_rows[max_block_rows(kBlockRows)];
    KLayout layout = br.window_layout();
    if (br.pool != Pool::kNone) {
      pool_tile(br, task.first, rows, buffer);
      for (int64_t i = 0; i < rows; ++i) a_rows[i] = buffer + i * br.input.channels;
      layout = {1, br.input.channels, 0};
    }
    for_each_pixel(br.out_shape, task.first, rows,
                   [&](int64_t i, int64_t n, int64_t h, int64_t w) {
                     if (br.pool == Pool::kNone) a_rows[i] = br.window(n, h, w);
                     c_rows[i] = br.out.pixel(n, h, w);
                   });
    gemm(rows, a_rows, layout, br.weights.w, br.weights.bias, c_rows, task.begin,
         task.end);
    if (pads(br))
      for_each_pixel(br.out_shape, task.first, rows,
                     [&](int64_t, int64_t n, int64_t h, int64_t w) {
                       redo_nonfinite_border_pixel(br, n, h, w, task.begin, task.end);
                     });
  });
}

#define INSTANTIATE(T)                                                                  \
  template void redo_nonfinite_border_pixel<T>(const ConvBranch<T>&, int64_t, int64_t, \
                                               int64_t, int64_t, int64_t);             \
  template void conv_step<T>(const ConvBranch<T>*, int64_t);
INSTANTIATE(float)
INSTANTIATE(double)
#undef INSTANTIATE

}  // namespace inception_cpu
