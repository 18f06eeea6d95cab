// The one GEMM routine every step of the CPU backend runs: a register-blocked
// micro-kernel computing C = relu(A @ B + bias) for a block of output pixels (or the
// raw product C = A @ B when bias is null: the Winograd-domain products).
//
// A is addressed through one pointer per output row (pixel), so the same kernel reads
// x rows (1x1 convs), a pooled tile (pool projection) or conv windows inside a
// zero-bordered map (implicit-GEMM 3x3 / 5x5) without copying anything into an
// im2col matrix. C is also addressed per row, so results land straight in a channel
// slice of the channels_last output or inside a zero-bordered scratch map.
//
// B (packed weights, [K, ncols] row-major with leading dimension ldb) is read in place:
// the weights are already stored output-channel-contiguous, which is the layout a
// broadcast-A / vector-B micro-kernel wants.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace inception_cpu {

// 256-bit SIMD vector of T (AVX2 with -march=x86-64-v3; plain loops elsewhere),
// through GCC/Clang vector extensions so one kernel source serves float and double.
template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float type __attribute__((vector_size(32)));
  static constexpr int width = 8;
};
template <>
struct Simd<double> {
  typedef double type __attribute__((vector_size(32)));
  static constexpr int width = 4;
};

// Unaligned load / store of a U (a SIMD vector of T, or one T) at p.
template <typename U, typename T>
inline U load(const T* p) {
  U u;
  std::memcpy(&u, p, sizeof(U));
  return u;
}

template <typename U, typename T>
inline void store(T* p, U u) {
  std::memcpy(p, &u, sizeof(U));
}

// Calls body(U{}, c) for c over [0, count): U a SIMD vector of T while a whole one
// fits, then U = T for the tail. Lets elementwise code be written once for both.
template <typename T, typename F>
inline void for_each_lane_group(int64_t count, const F& body) {
  using V = typename Simd<T>::type;
  int64_t c = 0;
  for (; c + Simd<T>::width <= count; c += Simd<T>::width) body(V{}, c);
  for (; c < count; ++c) body(T{}, c);
}

// The sum of U's lanes (U a SIMD vector of T, or one T).
template <typename T, typename U>
inline T lane_sum(U u) {
  if constexpr (sizeof(U) == sizeof(T)) {
    return u;
  } else {
    T lanes[sizeof(U) / sizeof(T)], sum = 0;
    std::memcpy(lanes, &u, sizeof(U));
    for (T lane : lanes) sum += lane;
    return sum;
  }
}

// max(x, 0) as torch.relu: a NaN stays NaN (it compares false), where std::max-style
// `x > 0 ? x : 0` would turn it into 0. U: a SIMD vector of T or one T.
template <typename U>
inline U relu(U x) {
  const U zero{};
  return x < zero ? zero : x;
}

// max(a, b) as max_pool2d: a NaN on either side gives NaN.
template <typename U>
inline U nan_max(U a, U b) {
  return ((b > a) | (b != b)) ? b : a;
}

// How the reduction dimension K is laid out in A: `segments` runs of `seg_len`
// contiguous elements, run s of row i starting at a_rows[i] + s * a_seg_stride, and
// matching B rows s * seg_len ... A 1x1 conv is one run of C_in; a KxK conv over a
// zero-bordered map is K runs (one per kernel row) of K * C contiguous elements.
struct KLayout {
  int64_t segments;
  int64_t seg_len;
  int64_t a_seg_stride;
};

// Micro-kernel tile size: MR rows x NV vectors of columns held in registers
// (6 x 2 ymm = 12 accumulators + 2 B vectors + 1 broadcast fit AVX2's 16 registers).
constexpr int kTileRows = 6;
constexpr int kTileVecs = 2;

// One MR x (NV * width) tile of C at column j.
template <typename T, int MR, int NV>
inline void micro_tile(const T* const* a_rows, const KLayout& kl, const T* b,
                       int64_t ldb, const T* bias, T* const* c_rows, int64_t j) {
  using V = typename Simd<T>::type;
  constexpr int W = Simd<T>::width;
  V acc[MR][NV] = {};
  for (int64_t s = 0; s < kl.segments; ++s) {
    const T* a[MR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) a[i] = a_rows[i] + s * kl.a_seg_stride;
    const T* b_row = b + s * kl.seg_len * ldb + j;
    for (int64_t k = 0; k < kl.seg_len; ++k, b_row += ldb) {
      V bv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) bv[v] = load<V>(b_row + v * W);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const T ai = a[i][k];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[i][v] += ai * bv[v];
      }
    }
  }
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const V bias_v = bias ? load<V>(bias + j + v * W) : V{};
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const V r = acc[i][v] + bias_v;
      store(c_rows[i] + j + v * W, bias ? relu(r) : r);
    }
  }
}

// The last ncols - j (< one vector) columns, for channel counts not a multiple of the
// vector width: scalar, only odd shapes take it.
template <typename T>
inline void edge_columns(int64_t rows, const T* const* a_rows, const KLayout& kl,
                         const T* b, int64_t ldb, const T* bias, T* const* c_rows,
                         int64_t j, int64_t ncols) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t col = j; col < ncols; ++col) {
      T acc = 0;
      for (int64_t s = 0; s < kl.segments; ++s) {
        const T* a = a_rows[i] + s * kl.a_seg_stride;
        const T* b_col = b + s * kl.seg_len * ldb + col;
        for (int64_t k = 0; k < kl.seg_len; ++k) acc += a[k] * b_col[k * ldb];
      }
      if (bias) acc = relu(acc + bias[col]);
      c_rows[i][col] = acc;
    }
  }
}

// A full-height tile (kTileRows) or the block's last, shorter one.
template <typename T, int NV>
inline void row_tile(int64_t mr, const T* const* a_rows, const KLayout& kl, const T* b,
                     int64_t ldb, const T* bias, T* const* c_rows, int64_t j) {
  switch (mr) {
    case 6: micro_tile<T, 6, NV>(a_rows, kl, b, ldb, bias, c_rows, j); break;
    case 5: micro_tile<T, 5, NV>(a_rows, kl, b, ldb, bias, c_rows, j); break;
    case 4: micro_tile<T, 4, NV>(a_rows, kl, b, ldb, bias, c_rows, j); break;
    case 3: micro_tile<T, 3, NV>(a_rows, kl, b, ldb, bias, c_rows, j); break;
    case 2: micro_tile<T, 2, NV>(a_rows, kl, b, ldb, bias, c_rows, j); break;
    default: micro_tile<T, 1, NV>(a_rows, kl, b, ldb, bias, c_rows, j); break;
  }
}
static_assert(kTileRows == 6, "row_tile dispatches tile heights 1..6");

// C[:, col_begin:col_end] = relu(A @ B[:, col_begin:col_end] + bias) for `rows` rows
// (without bias and ReLU when bias is null).
// Column panels outermost, so one B panel is reused by every row tile of the block
// while it sits in L1/L2.
template <typename T>
void gemm(int64_t rows, const T* const* a_rows, const KLayout& kl, const T* b,
          int64_t ldb, const T* bias, T* const* c_rows, int64_t col_begin,
          int64_t col_end) {
  constexpr int W = Simd<T>::width;
  int64_t j = col_begin;
  for (; j + kTileVecs * W <= col_end; j += kTileVecs * W)
    for (int64_t i = 0; i < rows; i += kTileRows)
      row_tile<T, kTileVecs>(std::min<int64_t>(kTileRows, rows - i), a_rows + i, kl, b,
                             ldb, bias, c_rows + i, j);
  for (; j + W <= col_end; j += W)
    for (int64_t i = 0; i < rows; i += kTileRows)
      row_tile<T, 1>(std::min<int64_t>(kTileRows, rows - i), a_rows + i, kl, b, ldb,
                     bias, c_rows + i, j);
  if (j < col_end) edge_columns(rows, a_rows, kl, b, ldb, bias, c_rows, j, col_end);
}

}  // namespace inception_cpu
