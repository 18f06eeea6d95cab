// CPU backend of inception_fused: the eval forward in two parallel steps over a
// channels_last output, mirroring the two Triton launches.
//
//   pointwise.cpp  step 1: x @ [W_1x1 | W_red3 | W_red5] and maxpool -> pool projection
//   spatial.cpp    step 2: the 3x3 / 5x5 convs over the reduce outputs, as implicit
//                  GEMMs or, for 3x3 kernels, Winograd F(2x2, 3x3) (winograd.cpp)
//   gemm.h         the register-blocked GEMM + bias + ReLU both steps run
//   inception.cpp  one block: the two steps over caller-provided buffers
//   network.cpp    the whole GoogLeNet eval forward over a NetworkPlan, one call
//   bindings.cpp   checks, allocation, the Python entry points
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
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
// The same blocks in every build (whole tiles of every width's register blocking), so
// a build changes how fast a task runs, never how the work is split.
constexpr int64_t kBlockRows = 48;
static_assert(kBlockRows % kTileRows == 0, "a block is whole row tiles");
template <typename T>
constexpr int64_t chunk_cols() {
  constexpr int64_t cols = 256 / sizeof(T);
  static_assert(cols % (kTileVecs * Simd<T>::width) == 0, "a chunk is whole panels");
  return cols;
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

// Zeroes everything of the map outside its interior (shape.height x shape.width pixels
// at offset pad): the conv's zero padding, plus the extra row / column Winograd's
// 2x2 tiles read when H or W is odd.
template <typename T>
void zero_border(const PaddedMap<T>& map, const Shape& shape) {
  const int64_t row_len = map.width * map.channels;
  const int64_t left = map.pad * map.channels;
  const int64_t right = (map.pad + shape.width) * map.channels;
  for (int64_t row = 0; row < shape.batch * map.height; ++row) {
    T* p = map.data + row * row_len;
    const int64_t h = row % map.height;
    if (h < map.pad || h >= map.pad + shape.height) {
      std::fill(p, p + row_len, T(0));
    } else {
      std::fill(p, p + left, T(0));
      std::fill(p + right, p + row_len, T(0));
    }
  }
}

// Height and width (border included) of the zero-bordered map a kernel x kernel conv
// reads over `shape`; Winograd's 2x2 tiles need an even interior.
struct MapDims {
  int64_t height, width;
  int64_t elements(const Shape& s, int64_t channels) const {
    return s.batch * height * width * channels;
  }
};
inline MapDims padded_dims(const Shape& s, int64_t kernel, bool winograd) {
  const int64_t pad = kernel / 2;
  return {s.height + 2 * pad + (winograd ? s.height % 2 : 0),
          s.width + 2 * pad + (winograd ? s.width % 2 : 0)};
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
// weights: the packed [kernel^2 * C, cols] matrix (row = tap * C + c); winograd (kernel 3
// only, else null): its transform by winograd_weights, [16 * C, cols] with the same ldb.
template <typename T>
struct SpatialBranch {
  PaddedMap<T> input;
  int64_t kernel;
  Weights<T> weights;
  const T* winograd;
  OutputSlice<T> out;

  // The implicit GEMM's K: `kernel` runs of kernel * C elements, a padded row apart.
  KLayout window_layout() const {
    return {kernel, kernel * input.channels, input.width * input.channels};
  }
};

// Winograd F(2x2, 3x3) (winograd.cpp). Tiles of 2x2 output pixels, enumerated like
// pixels over a (ceil(H/2), ceil(W/2)) grid; the input map needs an even interior
// (one more zero row / column when H / W is odd).
constexpr int64_t kWinogradTiles = 24;  // tiles per task: whole row tiles
static_assert(kWinogradTiles % kTileRows == 0, "a Winograd task is whole row tiles");

// u [16 * c_in, cols] = G g G^T of the packed 3x3 weights w [9 * c_in, cols].
template <typename T>
void winograd_weights(const T* w, int64_t c_in, int64_t cols, T* u);

// Output channels [col_begin, col_end) of the tiles tile0 ... tile0 + kWinogradTiles - 1
// of a 3x3 branch. buffer: a thread's 16 * kWinogradTiles * (C + chunk_cols) scratch.
template <typename T>
void winograd_tile_block(const Shape& shape, const SpatialBranch<T>& branch,
                         int64_t tile0, int64_t col_begin, int64_t col_end, T* buffer);

// For output pixel (n, h, w) of a branch, if its window overlaps the zero border and
// any of columns [col_begin, col_end) came out inf or NaN: recomputes those columns
// over the window's in-image taps only, as PyTorch's CPU convolution (oneDNN) does:
// padding must not turn an inf or NaN weight into NaN through 0 * inf.
template <typename T>
void redo_nonfinite_border_pixel(const Shape& shape, const SpatialBranch<T>& branch,
                                 int64_t n, int64_t h, int64_t w, int64_t col_begin,
                                 int64_t col_end);

// Step 2. out = relu(conv(input) + bias) for `count` spatial branches (an Inception
// block's 3x3 and 5x5; GoogLeNet's stem conv3 alone), as implicit GEMMs reading the
// zero-bordered maps in place, or Winograd.
template <typename T>
void spatial_step(const Shape& shape, const SpatialBranch<T>* branches, int64_t count);

// One Inception block's folded, packed weights (folding.py's FoldedInception).
template <typename T>
struct InceptionBlock {
  int64_t c_in, c1, r3, r5, c3, c5, c_pool, k3, k5;
  const T *stem_w, *stem_b, *pool_w, *pool_b, *w3, *b3, *w5, *b5;
  const T *winograd3, *winograd5;  // winograd_weights of w3 / w5, or null

  int64_t c_out() const { return c1 + c3 + c5 + c_pool; }
  MapDims map3(const Shape& s) const { return padded_dims(s, k3, winograd3); }
  MapDims map5(const Shape& s) const { return padded_dims(s, k5, winograd5); }
};

// The block's eval forward: x NHWC [shape, c_in] -> out NHWC [shape, c_out], with
// red3 / red5 scratch of map3 / map5 elements (inception.cpp).
template <typename T>
void inception_forward(const InceptionBlock<T>& block, const T* x, const Shape& shape,
                       T* out, T* red3, T* red5);

}  // namespace inception_cpu
