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
// B (the weights, [K, cols]) is packed once, when a Program is built, into column panels
// as wide as a micro-tile (pack_panels): a tile's B strip is then K consecutive cache
// lines. Read in place from a row-major [K, cols] matrix, a strip is K lines a row
// stride apart, and the common strides (cols = 384, 1152: multiples of 8 lines) map
// them onto 1/8 of the L2's sets: a 1280- or 2048-row strip does not stay in L2 for the
// next row tile and comes back from L3 or memory each time (1.7-2.3x slower).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace inception_cpu {

// This build's SIMD vector: the width is the ISA setup.py compiles the build for
// (128-bit baseline x86-64, 256-bit AVX2 + FMA, 512-bit AVX-512), through GCC/Clang
// vector extensions so one kernel source serves every width, float and double.
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
#elif defined(__AVX2__)
constexpr int kVectorBytes = 32;
#else
constexpr int kVectorBytes = 16;
#endif

template <typename T>
struct Simd {
  static constexpr int width = kVectorBytes / sizeof(T);
  typedef T type __attribute__((vector_size(kVectorBytes)));
  // Lanes of the integer type T's size: what vector comparisons give (0 or -1).
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> lane_int;
  typedef lane_int mask __attribute__((vector_size(kVectorBytes)));
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

// Lanes [0, n) all ones, the rest zero: the mask of a vector's first n lanes.
template <typename T>
inline typename Simd<T>::mask first_lanes(int n) {
  typename Simd<T>::mask index;
  for (int i = 0; i < Simd<T>::width; ++i) index[i] = i;
  return index < n;
}

// The first n (0 < n < width) lanes of a SIMD vector of T at p, the rest zero, and the
// matching store: the columns past a multiple of the width. Masked loads and stores
// where the ISA has them (AVX2's vmaskmov, AVX-512's mask registers), so nothing is
// read or written past the row; a byte copy on the baseline build, which has none.
template <typename T>
inline typename Simd<T>::type load_first(const T* p, int n) {
  using V = typename Simd<T>::type;
#if defined(__AVX512F__)
  if constexpr (sizeof(T) == 4)
    return (V)_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
  else
    return (V)_mm512_maskz_loadu_pd(static_cast<__mmask8>((1u << n) - 1), p);
#elif defined(__AVX2__)
  if constexpr (sizeof(T) == 4)
    return (V)_mm256_maskload_ps(p, (__m256i)first_lanes<T>(n));
  else
    return (V)_mm256_maskload_pd(p, (__m256i)first_lanes<T>(n));
#else
  V v{};
  std::memcpy(&v, p, n * sizeof(T));
  return v;
#endif
}

template <typename T>
inline void store_first(T* p, typename Simd<T>::type v, int n) {
#if defined(__AVX512F__)
  if constexpr (sizeof(T) == 4)
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), (__m512)v);
  else
    _mm512_mask_storeu_pd(p, static_cast<__mmask8>((1u << n) - 1), (__m512d)v);
#elif defined(__AVX2__)
  if constexpr (sizeof(T) == 4)
    _mm256_maskstore_ps(p, (__m256i)first_lanes<T>(n), (__m256)v);
  else
    _mm256_maskstore_pd(p, (__m256i)first_lanes<T>(n), (__m256d)v);
#else
  std::memcpy(p, &v, n * sizeof(T));
#endif
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

// Micro-kernel tile: kTileRows rows x kTileVecs vectors of columns held in registers.
// AVX2 and the baseline have 16 vector registers: 6 x 2 = 12 accumulators + 2 B vectors
// + 1 broadcast. AVX-512 has 32: 12 x 2 = 24 accumulators + 2 B (FMAs broadcast A
// from memory), twice the work per B load.
#if defined(__AVX512F__)
constexpr int kTileRows = 12;
#else
constexpr int kTileRows = 6;
#endif
constexpr int kTileVecs = 2;
// B rows a panel's first micro-tile asks for ahead of the one it multiplies: a memory
// latency (~100 ns) over a row's time (a few ns). 0 was 6-8% slower at batch 1 than 16;
// 32 is 3% faster than 16 (Winograd's short panels, K = C_in, end before 16 rows of
// hints have arrived), 48 as fast as 32.
constexpr int64_t kPrefetchRows = 32;

// B packed for gemm: column panels in the order gemm walks them (kTileVecs vectors wide
// while a whole panel fits, then one vector wide, the last one zero-padded to a whole
// vector), each [K, panel width] contiguous; the panel at column j starts at j * K. A
// panel-aligned column (a multiple of kPanelCols) starts a packed matrix of its own.
template <typename T>
constexpr int64_t kPanelCols = kTileVecs * Simd<T>::width;

template <typename T>
int64_t panel_cols(int64_t j, int64_t cols) {
  return j + kPanelCols<T> <= cols ? kPanelCols<T> : Simd<T>::width;
}

// Elements of [K, cols] packed.
template <typename T>
int64_t packed_size(int64_t k, int64_t cols) {
  constexpr int64_t W = Simd<T>::width;
  return k * ((cols + W - 1) / W * W);
}

// out (packed_size elements) = the panels of w [K, cols], row stride ldw.
template <typename T>
void pack_panels(const T* w, int64_t k, int64_t ldw, int64_t cols, T* out) {
  for (int64_t j = 0; j < cols; j += panel_cols<T>(j, cols)) {
    const int64_t width = panel_cols<T>(j, cols), real = std::min(width, cols - j);
    T* panel = out + j * k;
    for (int64_t row = 0; row < k; ++row) {
      std::copy_n(w + row * ldw + j, real, panel + row * width);
      std::fill(panel + row * width + real, panel + (row + 1) * width, T(0));
    }
  }
}

// B[row, col] of a packed [K, cols].
template <typename T>
T packed_at(const T* b, int64_t k, int64_t cols, int64_t row, int64_t col) {
  const int64_t full = cols / kPanelCols<T> * kPanelCols<T>;  // columns in wide panels
  const int64_t width = col < full ? kPanelCols<T> : Simd<T>::width;
  const int64_t j = col < full ? col - col % width : full + (col - full) / width * width;
  return b[j * k + row * width + col - j];
}

// One MR x (NV * width) tile of C at column j from the panel b ([K, NV * width]); with
// Edge, its last vector covers only the `lanes` columns left of the row (masked bias
// loads and stores; the panel's padding is zeros).
template <typename T, int MR, int NV, bool Edge>
inline void micro_tile(const T* const* a_rows, const KLayout& kl, const T* b,
                       const T* bias, T* const* c_rows, int64_t j, int lanes,
                       const T* ahead, int64_t ahead_step) {
  using V = typename Simd<T>::type;
  constexpr int W = Simd<T>::width;
  constexpr int64_t ldb = NV * W;
  V acc[MR][NV] = {};
  for (int64_t s = 0; s < kl.segments; ++s) {
    const T* a[MR];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) a[i] = a_rows[i] + s * kl.a_seg_stride;
    const T* b_row = b + s * kl.seg_len * ldb;
    for (int64_t k = 0; k < kl.seg_len; ++k, b_row += ldb) {
      // A batch-1 forward's weights are cold: one hint per row of B, walking from
      // `ahead` (panel() says which bytes: this panel's rows kPrefetchRows ahead, or a
      // share of the next panel's), arrives before the row that needs it. A hint past
      // B's end is dropped harmlessly.
      __builtin_prefetch(ahead);
      if constexpr (ldb * sizeof(T) > 64) __builtin_prefetch(ahead + 64 / sizeof(T));
      ahead += ahead_step;
      V bv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) bv[v] = load<V>(b_row + v * W);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        const T ai = a[i][k];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[i][v] += ai * bv[v];
      }
    }
  }
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const bool edge = Edge && v == NV - 1;
    V bias_v{};
    if (bias) {
      const T* bias_j = bias + j + v * W;
      bias_v = edge ? load_first(bias_j, lanes) : load<V>(bias_j);
    }
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const V r = bias ? relu(acc[i][v] + bias_v) : acc[i][v];
      if (edge)
        store_first(c_rows[i] + j + v * W, r, lanes);
      else
        store(c_rows[i] + j + v * W, r);
    }
  }
}

// A full-height tile (MR = kTileRows) or the block's last, shorter one (mr < MR).
template <typename T, int NV, bool Edge, int MR = kTileRows>
inline void row_tile(int64_t mr, const T* const* a_rows, const KLayout& kl, const T* b,
                     const T* bias, T* const* c_rows, int64_t j, int lanes,
                     const T* ahead, int64_t ahead_step) {
  if constexpr (MR > 1) {
    if (mr < MR) {
      row_tile<T, NV, Edge, MR - 1>(mr, a_rows, kl, b, bias, c_rows, j, lanes, ahead,
                                    ahead_step);
      return;
    }
  }
  micro_tile<T, MR, NV, Edge>(a_rows, kl, b, bias, c_rows, j, lanes, ahead, ahead_step);
}

// The tiles of one column panel [j, j + NV * width), its last vector `lanes` wide.
// The first row tile streams the panel, prefetching kPrefetchRows ahead; the later
// ones find it cached and spend their prefetches on `next` (next_size elements, the
// B multiplied after this panel), a share each, so it too arrives before it is needed.
template <typename T, int NV, bool Edge>
inline void panel(int64_t rows, const T* const* a_rows, const KLayout& kl, const T* b,
                  const T* bias, T* const* c_rows, int64_t j, int lanes, const T* next,
                  int64_t next_size) {
  constexpr int64_t ldb = NV * Simd<T>::width;
  const int64_t k = kl.segments * kl.seg_len, tiles = (rows + kTileRows - 1) / kTileRows;
  const int64_t share = next && tiles > 1 ? (next_size + tiles - 2) / (tiles - 1) : 0;
  for (int64_t i = 0, t = 0; i < rows; i += kTileRows, ++t) {
    const bool own = t == 0 || share == 0;
    const T* ahead = own ? b + kPrefetchRows * ldb : next + (t - 1) * share;
    const int64_t step = own ? ldb : (share + k - 1) / k;
    row_tile<T, NV, Edge>(std::min<int64_t>(kTileRows, rows - i), a_rows + i, kl, b,
                          bias, c_rows + i, j, lanes, ahead, step);
  }
}

// C[:, col_begin:col_end] = relu(A @ B[:, col_begin:col_end] + bias) for `rows` rows
// (without bias and ReLU when bias is null), B packed (pack_panels). col_begin is a
// multiple of kPanelCols, col_end one too or B's last column.
// Column panels outermost, so one B panel is reused by every row tile of the block
// while it sits in L1/L2. Columns past a multiple of the width: one masked vector.
template <typename T>
void gemm(int64_t rows, const T* const* a_rows, const KLayout& kl, const T* b,
          const T* bias, T* const* c_rows, int64_t col_begin, int64_t col_end,
          const T* next_b = nullptr, int64_t next_size = 0) {
  constexpr int W = Simd<T>::width;
  const int64_t k = kl.segments * kl.seg_len;
  // The B after panel j: the next panel, or after the last one the caller's next_b.
  const auto next = [&](int64_t j_next) { return j_next < col_end ? b + j_next * k : next_b; };
  const auto size = [&](int64_t j_next) {
    return j_next < col_end ? k * panel_cols<T>(j_next, col_end) : next_size;
  };
  int64_t j = col_begin;
  for (; j + kPanelCols<T> <= col_end; j += kPanelCols<T>)
    panel<T, kTileVecs, false>(rows, a_rows, kl, b + j * k, bias, c_rows, j, W,
                               next(j + kPanelCols<T>), size(j + kPanelCols<T>));
  for (; j + W <= col_end; j += W)
    panel<T, 1, false>(rows, a_rows, kl, b + j * k, bias, c_rows, j, W, next(j + W),
                       size(j + W));
  if (j < col_end)
    panel<T, 1, true>(rows, a_rows, kl, b + j * k, bias, c_rows, j, col_end - j,
                      next_b, next_size);
}

}  // namespace inception_cpu
