// CPU backend of inception_fused: the eval forward in two parallel steps over a
// channels_last output, mirroring the two Triton launches.
//
//   pointwise.cpp  step 1: x @ [W_1x1 | W_red3 | W_red5] and maxpool -> pool projection
//   spatial.cpp    step 2: the 3x3 / 5x5 convs over the reduce outputs, as implicit
//                  GEMMs or, for 3x3 kernels, Winograd F(2x2, 3x3) (winograd.cpp)
//   gemm.h         the register-blocked GEMM + bias + ReLU both steps run
//   bindings.cpp   checks, allocation, the Python entry point
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

#include "gemm.h"

namespace inception_cpu {

// Output pixels of an NHWC map, enumerated as m = (n * height + h) * width + w.
struct Shape {
  int64_t batch, height, width;
  int64_t pixels() const { return batch * height * width; }
};

// A GEMM's right-hand side: packed weights [K, cols] with row stride ldb (a column
// range of a wider matrix when ldb > cols) and their bias.
template <typename T>
struct Weights {
  const T* w;
  int64_t ldb;
  const T* bias;
  int64_t cols;
};

// One branch's channel slice of the channels_last output: row m starts at
// data + m * row_stride (data already points at the slice's first channel).
template <typename T>
struct OutputSlice {
  T* data;
  int64_t row_stride;
};

// NHWC map with a zero border of `pad` pixels, so a (2 pad + 1)^2 conv reads every
// window without bounds checks; height and width include the border.
template <typename T>
struct PaddedMap {
  T* data;
  int64_t channels, pad, height, width;

  T* pixel(int64_t n, int64_t h, int64_t w) const {
    return data + ((n * height + h + pad) * width + w + pad) * channels;
  }
  // Top-left corner of the window centred on output pixel (h, w).
  const T* window(int64_t n, int64_t h, int64_t w) const {
    return data + ((n * height + h) * width + w) * channels;
  }
};

// Work is split into blocks of output pixels times column chunks, so that even a
// 7x7 map at batch 1 gives every thread several tasks.
constexpr int64_t kBlockRows = 8 * kTileRows;
template <typename T>
constexpr int64_t chunk_cols() {
  return 4 * kTileVecs * Simd<T>::width;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Runs fn(task) for task in [0, count) on torch's intra-op threads (OpenMP here),
// dynamically scheduled: tasks differ in cost (pool tiles, 3x3 vs 5x5, edge blocks).
template <typename F>
void parallel_tasks(int64_t count, const F& fn) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads())
  for (int64_t task = 0; task < count; ++task) fn(task);
}

// Calls fn(i, n, h, w) for the pixels m0 + i, i < rows, of an NHWC map.
template <typename F>
inline void for_each_pixel(const Shape& s, int64_t m0, int64_t rows, const F& fn) {
  int64_t w = m0 % s.width, h = (m0 / s.width) % s.height,
          n = m0 / (s.width * s.height);
  for (int64_t i = 0; i < rows; ++i) {
    fn(i, n, h, w);
    if (++w == s.width) {
      w = 0;
      if (++h == s.height) h = 0, ++n;
    }
  }
}

// Step 1. Reads x (NHWC, c_in channels) once per pixel block: the stem GEMM writes
// branch 1 into `out1` and the reduce outputs into the interiors of red3 / red5 (whose
// borders it zeroes); pool tiles take the 3x3/s1/p1 max into a per-thread buffer and
// multiply it by the pool projection into `out_pool`.
template <typename T>
void pointwise_step(const T* x, const Shape& shape, int64_t c_in,
                    const Weights<T>& branch1, const Weights<T>& reduce3,
                    const Weights<T>& reduce5, const Weights<T>& pool_proj,
                    const OutputSlice<T>& out1, const OutputSlice<T>& out_pool,
                    const PaddedMap<T>& red3, const PaddedMap<T>& red5);

// One spatial branch of step 2: a kernel x kernel conv over a zero-bordered reduce map.
// weights: the packed [kernel^2 * C, cols] matrix (row = tap * C + c), or with
// `winograd` (kernel 3 only) the transformed [16 * C, cols] one of winograd_weights.
template <typename T>
struct SpatialBranch {
  PaddedMap<T> input;
  int64_t kernel;
  Weights<T> weights;
  OutputSlice<T> out;
  bool winograd;
};

// Winograd F(2x2, 3x3) (winograd.cpp). Tiles of 2x2 output pixels, enumerated like
// pixels over a (ceil(H/2), ceil(W/2)) grid; the input map needs an even interior
// (one more zero row / column when H / W is odd).
constexpr int64_t kWinogradTiles = 4 * kTileRows;  // tiles per task

// u [16 * c_in, cols] = G g G^T of the packed 3x3 weights w [9 * c_in, cols].
template <typename T>
void winograd_weights(const T* w, int64_t c_in, int64_t cols, T* u);

// Output channels [col_begin, col_end) of the tiles tile0 ... tile0 + kWinogradTiles - 1
// of a 3x3 branch. buffer: a thread's 16 * kWinogradTiles * (C + chunk_cols) scratch.
template <typename T>
void winograd_tile_block(const Shape& shape, const SpatialBranch<T>& branch,
                         int64_t tile0, int64_t col_begin, int64_t col_end, T* buffer);

// Step 2. out = relu(conv(input) + bias) for the 3x3 and 5x5 branches, as implicit
// GEMMs reading the zero-bordered reduce maps in place.
template <typename T>
void spatial_step(const Shape& shape, const SpatialBranch<T>& branch3,
                  const SpatialBranch<T>& branch5);

}  // namespace inception_cpu
