// Winograd F(m x m, 3x3) convolution (Lavin & Gray, arXiv 1509.09308) for 3x3 stride-1
// branches, m = 2 or 4.
//
// Each m x m block of outputs comes from an n x n input tile d, n = m + 2:
//   Y = A^T [ sum_c (G g_c G^T) ⊙ (B^T d_c B) ] A,
// which is n^2 independent GEMMs (one per position xi of the transformed tile) of
// [tiles, C] x [C, cols]: n^2 / m^2 multiplies per (output pixel, input, output channel)
// where direct convolution needs 9, i.e. 2.25x (m = 2) or 4x (m = 4) fewer GEMM flops.
// Per task a block of tiles is transformed into a thread's buffer, multiplied by the
// transformed weights U_xi, and transformed back with bias + ReLU into the output slice.
// Only the 1-D transforms below depend on m; tiles, buffers, borders and the
// non-finite fallback follow from it.
#include "inception_cpu.h"

namespace inception_cpu {
namespace {

// The 1-D transforms of F(m, 3): input i at [i * s], output i at [i * so] (1 along a
// row, n down a column), written once for U = T and U = a SIMD vector of T (channels).
// F(2, 3) interpolates at 0, 1, -1 and infinity, F(4, 3) at 0, 1, -1, 2, -2 and
// infinity: B^T, G, A^T as in Lavin & Gray, with the common subexpressions taken out.
// B^T d: n inputs -> n transformed.
template <int M, typename U>
inline void input_1d(const U* d, int s, U* v, int so) {
  if constexpr (M == 2) {
    v[0] = d[0] - d[2 * s];
    v[so] = d[s] + d[2 * s];
    v[2 * so] = d[2 * s] - d[s];
    v[3 * so] = d[s] - d[3 * s];
  } else {
    static_assert(M == 4);
    const U d0 = d[0], d1 = d[s], d2 = d[2 * s], d3 = d[3 * s], d4 = d[4 * s],
            d5 = d[5 * s];
    const U even4 = d4 - 4 * d2, odd4 = d3 - 4 * d1;  // rows 1 and 2
    const U even2 = d4 - d2, odd2 = 2 * (d3 - d1);      // rows 3 and 4
    v[0] = 4 * (d0 - d2) + even2;
    v[so] = even4 + odd4;
    v[2 * so] = even4 - odd4;
    v[3 * so] = even2 + odd2;
    v[4 * so] = even2 - odd2;
    v[5 * so] = 4 * (d1 - d3) + (d5 - d3);
  }
}

// A^T x: n transformed -> m outputs.
template <int M, typename U>
inline void output_1d(const U* x, int s, U* y, int so) {
  const U sum12 = x[s] + x[2 * s], diff12 = x[s] - x[2 * s];
  if constexpr (M == 2) {
    y[0] = x[0] + sum12;
    y[so] = diff12 - x[3 * s];
  } else {
    static_assert(M == 4);
    const U sum34 = x[3 * s] + x[4 * s], diff34 = x[3 * s] - x[4 * s];
    y[0] = x[0] + sum12 + sum34;
    y[so] = diff12 + 2 * diff34;
    y[2 * so] = sum12 + 4 * sum34;
    y[3 * so] = diff12 + 8 * diff34 + x[5 * s];
  }
}

// G g: 3 taps -> n transformed, in double (F(4, 3)'s sixths and twenty-fourths are not
// exact in float; the caller rounds the 2-D result once).
template <int M>
inline void weight_1d(const double* g, int s, double* u, int so) {
  const double g0 = g[0], g1 = g[s], g2 = g[2 * s];
  if constexpr (M == 2) {
    u[0] = g0;
    u[so] = (g0 + g1 + g2) / 2;
    u[2 * so] = (g0 - g1 + g2) / 2;
    u[3 * so] = g2;
  } else {
    static_assert(M == 4);
    u[0] = g0 / 4;
    u[so] = -(g0 + g1 + g2) / 6;
    u[2 * so] = -(g0 - g1 + g2) / 6;
    u[3 * so] = (g0 + 2 * g1 + 4 * g2) / 24;
    u[4 * so] = (g0 - 2 * g1 + 4 * g2) / 24;
    u[5 * so] = g2;
  }
}

// A 2-D transform T x T^T of a row-major In x In block x into the Out x Out block y,
// from its 1-D form f(in, in_stride, out, out_stride) (In -> Out elements): down every
// column, then along every row. B^T d B, A^T m A and G g G^T are each this.
template <int In, int Out, typename U, typename F>
inline void transform_2d(const F& f, const U* x, U* y) {
  U t[Out * In];  // T x
  for (int j = 0; j < In; ++j) f(x + j, In, t + j, In);
  for (int i = 0; i < Out; ++i) f(t + In * i, 1, y + Out * i, 1);
}

// Tile t of a batch of (ceil(H/m) x ceil(W/m)) tile grids: image, top-left output pixel.
struct TileOrigin {
  int64_t n, y, x;
};

template <int M>
inline TileOrigin tile_origin(const Shape& s, int64_t tile) {
  const int64_t tiles_w = ceil_div(s.width, M), tiles_h = ceil_div(s.height, M);
  return {tile / (tiles_h * tiles_w), M * (tile / tiles_w % tiles_h),
          M * (tile % tiles_w)};
}

template <int M, typename T>
void weights_for(const T* w, int64_t c_in, int64_t cols, T* u) {
  constexpr int n = M + 2;
  at::parallel_for(0, c_in, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      for (int64_t j = 0; j < cols; ++j) {
        double g[9], t[n * n];
        for (int tap = 0; tap < 9; ++tap) g[tap] = w[(tap * c_in + c) * cols + j];
        transform_2d<3, n>([](auto... a) { weight_1d<M>(a...); }, g, t);
        for (int xi = 0; xi < n * n; ++xi)
          u[(xi * c_in + c) * cols + j] = static_cast<T>(t[xi]);
      }
    }
  });
}

template <int M, typename T>
void tile_block(const ConvBranch<T>& br, int64_t tile0, int64_t col_begin,
                int64_t col_end, T* buffer) {
  constexpr int n = M + 2;
  static_assert(M * M <= kWinogradTiles, "a tile's pixels fit the fallback's rows");
  const Shape& shape = br.out_shape;
  const PaddedMap<T>& map = br.input;
  const int64_t c_in = map.channels;
  const int64_t tiles =
      block_rows(winograd_tiles(shape, M), kWinogradTiles, tile0 / kWinogradTiles);
  constexpr int64_t kMaxTiles = max_block_rows(kWinogradTiles);
  // Tile-major ([tile][xi][...]): a tile's transforms read and write one contiguous
  // block, and the GEMMs address their rows through pointers anyway.
  T* v = buffer;                             // [kMaxTiles][n^2][c_in]
  T* m = buffer + n * n * kMaxTiles * c_in;  // [kMaxTiles][n^2][chunk]

  // Tiles whose input holds an inf or NaN: the transforms' sums and differences would
  // turn one inf into NaN over the whole m x m block, so those take the direct conv
  // below.
  int64_t nonfinite[kMaxTiles];
  int64_t n_nonfinite = 0;
  for (int64_t t = 0; t < tiles; ++t) {
    const TileOrigin o = tile_origin<M>(shape, tile0 + t);
    const T* corner = br.window(o.n, o.y, o.x);  // the n x n input tile's top-left
    T probe = 0;  // stays 0 while every input is finite (x - x is NaN for inf / NaN)
    for_each_lane_group<T>(c_in, [&](auto lanes, int64_t c) {
      using U = decltype(lanes);
      U d[n * n], vt[n * n], p{};
      for (int i = 0; i < n; ++i)
        for (int j = 0; j < n; ++j) {
          d[n * i + j] = load<U>(corner + (i * map.width + j) * c_in + c);
          p += d[n * i + j] - d[n * i + j];
        }
      transform_2d<n, n>([](auto... a) { input_1d<M>(a...); }, d, vt);
      for (int xi = 0; xi < n * n; ++xi)
        store(v + (t * n * n + xi) * c_in + c, vt[xi]);
      probe += lane_sum<T>(p);
    });
    if (probe != 0) nonfinite[n_nonfinite++] = t;
  }

  const T* a_rows[kMaxTiles];
  T* c_rows[kMaxTiles];
  const KLayout one_run{1, c_in, 0};
  const int64_t u_size = packed_size<T>(c_in, br.weights.cols);  // one xi's
  // The products of one chunk of columns at a time (m holds one), every chunk reading
  // the input tiles transformed once above.
  for (int64_t j0 = col_begin; j0 < col_end; j0 += chunk_cols<T>()) {
    const int64_t cols = std::min(chunk_cols<T>(), col_end - j0);
    for (int64_t xi = 0; xi < n * n; ++xi) {
      for (int64_t t = 0; t < tiles; ++t) {
        a_rows[t] = v + (t * n * n + xi) * c_in;
        c_rows[t] = m + (t * n * n + xi) * cols;
      }
      // Next: this chunk's U of the next xi, or after the last the next chunk's first.
      const int64_t next_xi = xi + 1 < n * n ? xi + 1 : 0;
      const int64_t next_j0 = xi + 1 < n * n ? j0 : j0 + chunk_cols<T>();
      const T* next = next_j0 < col_end ? br.winograd + next_xi * u_size + next_j0 * c_in
                                        : nullptr;
      const int64_t next_cols = std::min(chunk_cols<T>(), col_end - next_j0);
      gemm<T>(tiles, a_rows, one_run, br.winograd + xi * u_size + j0 * c_in, nullptr,
              c_rows, 0, cols, next, next ? c_in * next_cols : 0);
    }
    const T* bias = br.weights.bias + j0;
    for (int64_t t = 0; t < tiles; ++t) {
      const TileOrigin o = tile_origin<M>(shape, tile0 + t);
      for_each_lane_group<T>(cols, [&](auto lanes, int64_t j) {
        using U = decltype(lanes);
        U mt[n * n], y[M * M];
        for (int xi = 0; xi < n * n; ++xi)
          mt[xi] = load<U>(m + (t * n * n + xi) * cols + j);
        transform_2d<n, M>([](auto... a) { output_1d<M>(a...); }, mt, y);
        const U b = load<U>(bias + j);
        for (int dy = 0; dy < M && o.y + dy < shape.height; ++dy) {
          for (int dx = 0; dx < M && o.x + dx < shape.width; ++dx) {
            store(br.out.pixel(o.n, o.y + dy, o.x + dx) + j0 + j,
                  relu(y[M * dy + dx] + b));
          }
        }
      });
    }
  }

  // The non-finite tiles again, as conv_step's implicit GEMM (overwriting).
  for (int64_t k = 0; k < n_nonfinite; ++k) {
    const TileOrigin o = tile_origin<M>(shape, tile0 + nonfinite[k]);
    int64_t rows = 0;
    for (int dy = 0; dy < M && o.y + dy < shape.height; ++dy) {
      for (int dx = 0; dx < M && o.x + dx < shape.width; ++dx, ++rows) {
        a_rows[rows] = br.window(o.n, o.y + dy, o.x + dx);
        c_rows[rows] = br.out.pixel(o.n, o.y + dy, o.x + dx);
      }
    }
    gemm(rows, a_rows, br.window_layout(), br.weights.w, br.weights.bias, c_rows,
         col_begin, col_end);
  }
  for (int64_t t = 0; t < tiles; ++t) {
    const TileOrigin o = tile_origin<M>(shape, tile0 + t);
    for (int dy = 0; dy < M && o.y + dy < shape.height; ++dy)
      for (int dx = 0; dx < M && o.x + dx < shape.width; ++dx)
        redo_nonfinite_border_pixel(br, o.n, o.y + dy, o.x + dx, col_begin, col_end);
  }
}

}  // namespace

template <typename T>
void winograd_weights(const T* w, int64_t c_in, int64_t cols, int64_t tile, T* u) {
  if (tile == 2) weights_for<2>(w, c_in, cols, u);
  else weights_for<4>(w, c_in, cols, u);
}

template <typename T>
void winograd_tile_block(const ConvBranch<T>& br, int64_t tile0, int64_t col_begin,
                         int64_t col_end, T* buffer) {
  if (br.winograd_tile == 2) tile_block<2>(br, tile0, col_begin, col_end, buffer);
  else tile_block<4>(br, tile0, col_begin, col_end, buffer);
}

#define INSTANTIATE(T)                                                           \
  template void winograd_weights<T>(const T*, int64_t, int64_t, int64_t, T*);    \
  template void winograd_tile_block<T>(const ConvBranch<T>&, int64_t, int64_t,   \
                                       int64_t, T*);
INSTANTIATE(float)
INSTANTIATE(double)
#undef INSTANTIATE

}  // namespace inception_cpu
