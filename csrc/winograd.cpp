// Winograd F(2x2, 3x3) convolution (Lavin & Gray, arXiv 1509.09308) for 3x3 branches.
//
// Each 2x2 block of outputs comes from a 4x4 input tile d:
//   Y = A^T [ sum_c (G g_c G^T) ⊙ (B^T d_c B) ] A,
// which is 16 independent GEMMs (one per position xi of the 4x4 transformed tile) of
// [tiles, C] x [C, cols]: 16 multiplies per (tile, input, output channel) where direct
// convolution needs 36, i.e. 2.25x fewer GEMM flops. Per task a block of tiles is
// transformed into a thread's buffer (cache-resident), multiplied by the transformed
// weights U_xi, and transformed back with bias + ReLU into the output slice.
#include "inception_cpu.h"

namespace inception_cpu {
namespace {

// The transforms are written once for U = T and U = a SIMD vector of T (channels).
// B^T d B for one 4x4 tile, d row-major, v[4 * i + j].
template <typename U>
inline void input_transform(const U d[4][4], U v[16]) {
  U t[4][4];  // B^T d
  for (int j = 0; j < 4; ++j) {
    t[0][j] = d[0][j] - d[2][j];
    t[1][j] = d[1][j] + d[2][j];
    t[2][j] = d[2][j] - d[1][j];
    t[3][j] = d[1][j] - d[3][j];
  }
  for (int i = 0; i < 4; ++i) {
    v[4 * i + 0] = t[i][0] - t[i][2];
    v[4 * i + 1] = t[i][1] + t[i][2];
    v[4 * i + 2] = t[i][2] - t[i][1];
    v[4 * i + 3] = t[i][1] - t[i][3];
  }
}

// A^T m A: the 2x2 outputs of one transformed tile m[4 * i + j].
template <typename U>
inline void output_transform(const U m[16], U y[2][2]) {
  U t[2][4];  // A^T m
  for (int j = 0; j < 4; ++j) {
    t[0][j] = m[j] + m[4 + j] + m[8 + j];
    t[1][j] = m[4 + j] - m[8 + j] - m[12 + j];
  }
  for (int i = 0; i < 2; ++i) {
    y[i][0] = t[i][0] + t[i][1] + t[i][2];
    y[i][1] = t[i][1] - t[i][2] - t[i][3];
  }
}

// G g G^T for one 3x3 kernel g, u[4 * i + j].
template <typename U>
inline void weight_transform(const U g[3][3], U u[16]) {
  U t[4][3];  // G g
  for (int j = 0; j < 3; ++j) {
    t[0][j] = g[0][j];
    t[1][j] = (g[0][j] + g[1][j] + g[2][j]) * 0.5f;
    t[2][j] = (g[0][j] - g[1][j] + g[2][j]) * 0.5f;
    t[3][j] = g[2][j];
  }
  for (int i = 0; i < 4; ++i) {
    u[4 * i + 0] = t[i][0];
    u[4 * i + 1] = (t[i][0] + t[i][1] + t[i][2]) * 0.5f;
    u[4 * i + 2] = (t[i][0] - t[i][1] + t[i][2]) * 0.5f;
    u[4 * i + 3] = t[i][2];
  }
}

// Tile t of a batch of (ceil(H/2) x ceil(W/2)) tile grids: image, and top-left output pixel.
struct TileOrigin {
  int64_t n, y, x;
};

inline TileOrigin tile_origin(const Shape& s, int64_t tile) {
  const int64_t tiles_w = ceil_div(s.width, 2), tiles_h = ceil_div(s.height, 2);
  return {tile / (tiles_h * tiles_w), 2 * (tile / tiles_w % tiles_h), 2 * (tile % tiles_w)};
}

}  // namespace

template <typename T>
void winograd_weights(const T* w, int64_t c_in, int64_t cols, T* u) {
  at::parallel_for(0, c_in, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      for_each_lane_group<T>(cols, [&](auto lanes, int64_t j) {
        using U = decltype(lanes);
        U g[3][3], t[16];
        for (int ky = 0; ky < 3; ++ky)
          for (int kx = 0; kx < 3; ++kx)
            g[ky][kx] = load<U>(w + ((ky * 3 + kx) * c_in + c) * cols + j);
        weight_transform(g, t);
        for (int xi = 0; xi < 16; ++xi) store(u + (xi * c_in + c) * cols + j, t[xi]);
      });
    }
  });
}

template <typename T>
void winograd_tile_block(const ConvBranch<T>& br, int64_t tile0, int64_t col_begin,
                         int64_t col_end, T* buffer) {
  const Shape& shape = br.out_shape;
  const PaddedMap<T>& map = br.input;
  const int64_t c_in = map.channels, cols = col_end - col_begin;
  const int64_t tiles = std::min(
      kWinogradTiles,
      shape.batch * ceil_div(shape.height, 2) * ceil_div(shape.width, 2) - tile0);
  T* v = buffer;                               // [16][kWinogradTiles][c_in]
  T* m = buffer + 16 * kWinogradTiles * c_in;  // [16][kWinogradTiles][cols]

  // Tiles whose input holds an inf or NaN: the transforms' sums and differences would
  // turn one inf into NaN over the whole 2x2 block, so those take the direct conv below.
  int64_t nonfinite[kWinogradTiles];
  int64_t n_nonfinite = 0;
  for (int64_t t = 0; t < tiles; ++t) {
    const TileOrigin o = tile_origin(shape, tile0 + t);
    const T* corner = br.window(o.n, o.y, o.x);  // the 4x4 input tile's top-left
    T probe = 0;  // stays 0 while every input is finite (x - x is NaN for inf / NaN)
    for_each_lane_group<T>(c_in, [&](auto lanes, int64_t c) {
      using U = decltype(lanes);
      U d[4][4], vt[16], p{};
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) {
          d[i][j] = load<U>(corner + (i * map.width + j) * c_in + c);
          p += d[i][j] - d[i][j];
        }
      input_transform(d, vt);
      for (int xi = 0; xi < 16; ++xi)
        store(v + (xi * kWinogradTiles + t) * c_in + c, vt[xi]);
      probe += lane_sum<T>(p);
    });
    if (probe != 0) nonfinite[n_nonfinite++] = t;
  }

  const T* a_rows[kWinogradTiles];
  T* c_rows[kWinogradTiles];
  const KLayout one_run{1, c_in, 0};
  const int64_t ldb = br.weights.ldb;
  for (int64_t xi = 0; xi < 16; ++xi) {
    for (int64_t t = 0; t < tiles; ++t) {
      a_rows[t] = v + (xi * kWinogradTiles + t) * c_in;
      c_rows[t] = m + (xi * kWinogradTiles + t) * cols;
    }
    gemm<T>(tiles, a_rows, one_run, br.winograd + xi * c_in * ldb + col_begin, ldb,
            nullptr, c_rows, 0, cols);
  }

  const T* bias = br.weights.bias + col_begin;
  for (int64_t t = 0; t < tiles; ++t) {
    const TileOrigin o = tile_origin(shape, tile0 + t);
    for_each_lane_group<T>(cols, [&](auto lanes, int64_t j) {
      using U = decltype(lanes);
      U mt[16], y[2][2];
      for (int xi = 0; xi < 16; ++xi)
        mt[xi] = load<U>(m + (xi * kWinogradTiles + t) * cols + j);
      output_transform(mt, y);
      const U b = load<U>(bias + j);
      for (int dy = 0; dy < 2 && o.y + dy < shape.height; ++dy) {
        for (int dx = 0; dx < 2 && o.x + dx < shape.width; ++dx) {
          store(br.out.pixel(o.n, o.y + dy, o.x + dx) + col_begin + j,
                relu(y[dy][dx] + b));
        }
      }
    });
  }

  // The non-finite tiles again, as conv_step's implicit GEMM (overwriting).
  for (int64_t k = 0; k < n_nonfinite; ++k) {
    const TileOrigin o = tile_origin(shape, tile0 + nonfinite[k]);
    int64_t rows = 0;
    for (int dy = 0; dy < 2 && o.y + dy < shape.height; ++dy) {
      for (int dx = 0; dx < 2 && o.x + dx < shape.width; ++dx, ++rows) {
        a_rows[rows] = br.window(o.n, o.y + dy, o.x + dx);
        c_rows[rows] = br.out.pixel(o.n, o.y + dy, o.x + dx);
      }
    }
    gemm(rows, a_rows, br.window_layout(), br.weights.w, br.weights.ldb,
         br.weights.bias, c_rows, col_begin, col_end);
  }
  for (int64_t t = 0; t < tiles; ++t) {
    const TileOrigin o = tile_origin(shape, tile0 + t);
    for (int dy = 0; dy < 2 && o.y + dy < shape.height; ++dy)
      for (int dx = 0; dx < 2 && o.x + dx < shape.width; ++dx)
        redo_nonfinite_border_pixel(br, o.n, o.y + dy, o.x + dx, col_begin, col_end);
  }
}

#define INSTANTIATE(T)                                                         \
  template void winograd_weights<T>(const T*, int64_t, int64_t, T*);           \
  template void winograd_tile_block<T>(const ConvBranch<T>&, int64_t, int64_t, \
                                       int64_t, T*);
INSTANTIATE(float)
INSTANTIATE(double)
#undef INSTANTIATE

}  // namespace inception_cpu
