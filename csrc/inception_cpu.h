// CPU backend of inception_fused: eval forwards as steps of fused conv + bias + ReLU
// branches over channels_last maps, each branch storing into its channel slice.
//
//   conv.cpp       conv_step: one parallel region of branches (1x1s reading x, pool
//                  branches with their pool taken while loading, kh x kw convs as
//                  implicit GEMMs over zero-bordered maps)
//   winograd.cpp   Winograd F(2x2, 3x3) and F(4x4, 3x3) for 3x3 stride-1 branches
//   gemm.h         the register-blocked GEMM + bias + ReLU every step runs
//   layers.cpp     input load, max pools, the average-pool + FC head
//   program.cpp    a whole Inception network (GoogLeNet, Inception-v3, the FID
//                  models) or a run of its layers as one call: a Program of steps
//   bindings.cpp   the Python entry points
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

#include "gemm.h"

namespace inception_cpu {

// Output pixels of an NHWC map, enumerated as m = (n * height + h) * width + w.
struct Shape {
  int64_t batch, height, width;
  int64_t pixels() const { return batch * height * width; }
};

// A GEMM's right-hand side: weights [K, cols] in gemm's panels (pack_panels) and
// their bias.
template <typename T>
struct Weights {
  const T* w;
  const T* bias;
  int64_t cols;
};

// An NHWC map with a zero border of `pad` pixels on every side (and any extra rows /
// columns below and right that a reader's windows reach), so convs read every window
// without bounds checks; height and width include the border. `channels` is the pixel
// stride: a view of a channel slice (a branch's part of a block output) points `data` at
// the slice's first channel and keeps the whole map's stride.
template <typename T>
struct PaddedMap {
  T* data;
  int64_t channels, pad, height, width;

  T* pixel(int64_t n, int64_t h, int64_t w) const {
    return data + ((n * height + h + pad) * width + w + pad) * channels;
  }
  PaddedMap slice(int64_t channel) const {
    return {data + channel, channels, pad, height, width};
  }
};

// The unbordered map of `shape` at data (a block's channels_last output).
template <typename T>
PaddedMap<T> dense_map(T* data, int64_t channels, const Shape& shape) {
  return {data, channels, 0, shape.height, shape.width};
}

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
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// `rows` split into blocks of `size` rows, the last one taking a remainder of fewer
// than kTileRows rows as well: a task of a few rows streams its weights as a whole block
// does (a batch-1 7x7 map is 49 pixels: one block of 49, not 48 + 1).
inline int64_t block_count(int64_t rows, int64_t size) {
  return std::max<int64_t>(rows / size + (rows % size >= kTileRows), 1);
}
// The rows of block `block`, which starts at row block * size.
inline int64_t block_rows(int64_t rows, int64_t size, int64_t block) {
  return block + 1 < block_count(rows, size) ? size : rows - block * size;
}
// The most rows a block of `size` holds.
constexpr int64_t max_block_rows(int64_t size) { return size + kTileRows - 1; }

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
// at offset pad): the conv's zero padding, plus the extra rows / columns Winograd's
// m x m tiles read when m does not divide H or W.
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

// dst[c] for every channel c of `in`: the max (a NaN gives NaN, as max_pool2d) or the
// sum times `scale` over the pixels [h0, h1) x [w0, w1) of image n. Four vectors of
// channels at a time, held in registers across the window: each tap then reads a few
// whole cache lines of a pixel, and dst is written once.
template <typename T>
inline void pool_window(const PaddedMap<T>& in, int64_t n, int64_t h0, int64_t h1,
                        int64_t w0, int64_t w1, bool max, T scale, T* dst) {
  // Channels [c, c + nv * lanes) as nv Us (a SIMD vector of T, or one T).
  const auto pass = [&](auto u, auto nv, int64_t c) {
    using U = decltype(u);
    constexpr int NV = decltype(nv)::value, kLanes = sizeof(U) / sizeof(T);
    U acc[NV];
    const T* first = in.pixel(n, h0, w0) + c;
    for (int v = 0; v < NV; ++v) acc[v] = load<U>(first + v * kLanes);
    for (int64_t h = h0; h < h1; ++h) {
      const T* row = in.pixel(n, h, 0) + c;
      for (int64_t w = h == h0 ? w0 + 1 : w0; w < w1; ++w) {
        for (int v = 0; v < NV; ++v) {
          const U x = load<U>(row + w * in.channels + v * kLanes);
          acc[v] = max ? nan_max(acc[v], x) : acc[v] + x;
        }
      }
    }
    for (int v = 0; v < NV; ++v)
      store(dst + c + v * kLanes, max ? acc[v] : acc[v] * scale);
  };
  using V = typename Simd<T>::type;
  constexpr int64_t W = Simd<T>::width;
  const std::integral_constant<int, 4> four;
  const std::integral_constant<int, 1> one;
  int64_t c = 0;
  for (; c + 4 * W <= in.channels; c += 4 * W) pass(V{}, four, c);
  for (; c + W <= in.channels; c += W) pass(V{}, one, c);
  for (; c < in.channels; ++c) pass(T{}, one, c);
}

// A pool of the input taken while a 1x1 conv loads it: 3x3 windows, stride 1, padding
// 1 (the Inception pool branches). Averages count the padding (kAvg, torchvision) or
// only the taps inside the map (kAvgExcludePad, the FID networks' TensorFlow pooling).
enum class Pool : int64_t { kNone = 0, kMax = 1, kAvg = 2, kAvgExcludePad = 3 };

// One conv + bias + ReLU of a step: relu(conv(input) + bias) into a channel slice, as
// an implicit GEMM over the windows of a zero-bordered map (K = kh runs of kw * C
// contiguous elements, a bordered row apart: the packed weights' row order, tap * C + c)
// or, for 3x3 stride-1 kernels with `winograd` weights, Winograd F(m x m, 3x3).
template <typename T>
struct ConvBranch {
  PaddedMap<T> input;  // channels: the conv's C_in
  Shape in_shape;      // the input's interior
  int64_t kh, kw, stride, pad_h, pad_w;
  Pool pool;  // kh = kw = 1 when set
  Weights<T> weights;  // [kh * kw * C_in, cols] in panels
  const T* winograd;   // winograd_weights of `weights`, each xi's [C_in, cols] in panels
  int64_t winograd_tile;  // their m (the output tile side) when set
  Shape out_shape;
  PaddedMap<T> out;

  // Top-left corner of output pixel (h, w)'s window (the border absorbs the padding).
  const T* window(int64_t n, int64_t h, int64_t w) const {
    return input.data + ((n * input.height + h * stride + input.pad - pad_h) * input.width +
                         w * stride + input.pad - pad_w) * input.channels;
  }
  KLayout window_layout() const {
    return {kh, kw * input.channels, input.width * input.channels};
  }
};

// Output size of a conv along one side; <= 0 when the input is too small.
inline int64_t conv_size(int64_t size, int64_t kernel, int64_t stride, int64_t pad) {
  return size + 2 * pad < kernel ? 0 : (size + 2 * pad - kernel) / stride + 1;
}

// Rows / columns a reader's windows reach below / right of the input's interior. It
// computes whole tiles of `tile` x `tile` outputs (Winograd's m; 1 for direct convs).
inline int64_t reach_past(int64_t in_size, int64_t out_size, int64_t kernel,
                          int64_t stride, int64_t pad, int64_t tile) {
  const int64_t last = round_up(out_size, tile) - 1;  // the last output computed
  return std::max<int64_t>(last * stride + kernel - pad - in_size, 0);
}

// One step: every branch's output in one parallel region (pixel blocks or Winograd
// tile blocks x column chunks). Branches read maps written by earlier steps only.
template <typename T>
void conv_step(const ConvBranch<T>* branches, int64_t count);

// Winograd F(m x m, 3x3), m = 2 or 4 (winograd.cpp). Tiles of m x m output pixels,
// enumerated like pixels over a (ceil(H/m), ceil(W/m)) grid; the input map must hold
// the last tile's windows (reach_past with tile m).
constexpr int64_t kWinogradTiles = 24;  // tiles per task: whole row tiles
static_assert(kWinogradTiles % kTileRows == 0, "a Winograd task is whole row tiles");

inline int64_t winograd_tiles(const Shape& s, int64_t m) {
  return s.batch * ceil_div(s.height, m) * ceil_div(s.width, m);
}

// Whether a branch runs Winograd: it has the weights, and tiles enough that each
// transformed weight, (m + 2)^2 / 9 times the bytes of the direct one (4x for m = 4),
// serves at least a micro-tile's rows. A batch-1 7x7 map has 4 tiles: its GEMMs would
// stream 4x the weights for 4 rows, where the direct conv streams 1x for 49.
template <typename T>
bool runs_winograd(const ConvBranch<T>& br) {
  return br.winograd && winograd_tiles(br.out_shape, br.winograd_tile) >= kTileRows;
}

// The m of Winograd weights of u_rows = (m + 2)^2 * c_in rows; 0 when no m fits.
inline int64_t winograd_tile_of(int64_t u_rows, int64_t c_in) {
  for (int64_t m : {2, 4})
    if (u_rows == (m + 2) * (m + 2) * c_in) return m;
  return 0;
}

// A thread's scratch for winograd_tile_block: n^2 * (the most tiles of a block) *
// (C + chunk_cols), n = m + 2 (the transformed inputs, then the products of one column
// chunk).
template <typename T>
int64_t winograd_buffer_size(int64_t m, int64_t c_in) {
  return (m + 2) * (m + 2) * max_block_rows(kWinogradTiles) * (c_in + chunk_cols<T>());
}

// u [(m + 2)^2 * c_in, cols] = G g G^T of the packed 3x3 weights w [9 * c_in, cols],
// transformed in double and rounded once to T.
template <typename T>
void winograd_weights(const T* w, int64_t c_in, int64_t cols, int64_t m, T* u);

// Output channels [col_begin, col_end) of the block of tiles starting at tile0 (a
// multiple of kWinogradTiles; block_rows tells how many) of a 3x3 branch, col_begin a
// multiple of chunk_cols: the inputs are transformed once, then multiplied a chunk at a
// time. buffer: a thread's winograd_buffer_size scratch.
template <typename T>
void winograd_tile_block(const ConvBranch<T>& branch, int64_t tile0, int64_t col_begin,
                         int64_t col_end, T* buffer);

// For output pixel (n, h, w) of a branch, if its window overlaps the zero border and
// any of columns [col_begin, col_end) came out inf or NaN: recomputes those columns
// over the window's in-image taps only, as PyTorch's CPU convolution (oneDNN) does:
// padding must not turn an inf or NaN weight into NaN through 0 * inf.
template <typename T>
void redo_nonfinite_border_pixel(const ConvBranch<T>& branch, int64_t n, int64_t h,
                                 int64_t w, int64_t col_begin, int64_t col_end);

// The layers around the blocks (layers.cpp).
// x (any strides, [N, C, H, W]) -> the interior of `map` (border zeroed), as
// x_c * affine[c] + affine[C + c] when affine is not null.
template <typename T>
void load_input(const at::Tensor& x, const T* affine, const PaddedMap<T>& map);

// Output side of a max pool without padding, as PyTorch computes it (ceil mode: the
// last window must start inside the input; it may hang over the edge). 0: too small.
int64_t pooled_size(int64_t size, int64_t kernel, int64_t stride, bool ceil_mode);

// out = max over kernel x kernel windows (stride `stride`, clipped at the bottom /
// right edge as ceil_mode does) of all `in.channels` channels; a NaN gives NaN.
template <typename T>
void max_pool(const PaddedMap<T>& in, const Shape& in_shape, int64_t kernel,
              int64_t stride, const Shape& out_shape, const PaddedMap<T>& out);

// features [N, C] = the average over the interior of `in`; then, when fc_w ([C, classes]
// in panels) is given, logits [N, classes] = features @ fc_w + fc_b.
template <typename T>
void average_head(const PaddedMap<T>& in, const Shape& shape, T* features,
                  const T* fc_w, const T* fc_b, int64_t classes, T* logits);

}  // namespace inception_cpu
