// The layers around the Inception blocks: the image load, the max pools between
// stages, the average pool + FC head.
#include <ATen/Dispatch.h>

#include <algorithm>

#include "inception_cpu.h"

namespace inception_cpu {

template <typename T>
void load_input(const at::Tensor& x, const T* affine, const PaddedMap<T>& map) {
  const Shape shape{x.size(0), x.size(2), x.size(3)};
  const int64_t c_in = x.size(1);
  zero_border(map, shape);
  const T* src = x.data_ptr<T>();
  const int64_t sn = x.stride(0), sc = x.stride(1), sh = x.stride(2), sw = x.stride(3);
  // Channel by channel along a row: x's reads run along w (contiguous in NCHW).
  parallel_tasks(shape.batch * shape.height, [&](int64_t row) {
    const int64_t n = row / shape.height, h = row % shape.height;
    T* dst = map.pixel(n, h, 0);
    for (int64_t c = 0; c < c_in; ++c) {
      const T* x_row = src + n * sn + c * sc + h * sh;
      T* d = dst + c;
      if (affine) {
        const T scale = affine[c], shift = affine[c_in + c];
        for (int64_t w = 0; w < shape.width; ++w)
          d[w * map.channels] = x_row[w * sw] * scale + shift;
      } else {
        for (int64_t w = 0; w < shape.width; ++w) d[w * map.channels] = x_row[w * sw];
      }
    }
  });
}

int64_t pooled_size(int64_t size, int64_t kernel, int64_t stride, bool ceil_mode) {
  if (!ceil_mode) return size < kernel ? 0 : (size - kernel) / stride + 1;
  if (size - kernel + stride - 1 < 0) return 0;
  int64_t out = (size - kernel + stride - 1) / stride + 1;
  if ((out - 1) * stride >= size) --out;
  return out;
}

// A max pool reads the map its producer just wrote, from memory at batch 8 (19 MB
// after conv3): each output pixel prefetches its rows' input pixels this many columns
// ahead. Batch 8, in the network: the four pools 2.9-4.0 -> 2.0-2.9 ms (16 ahead: 2.2-3.1,
// 32: 2.7-3.5); batch 1 unchanged (0.16 ms, 0.44 -> 0.31 in a slow phase).
constexpr int64_t kPoolAhead = 8;

template <typename T>
void max_pool(const PaddedMap<T>& in, const Shape& in_shape, int64_t kernel,
              int64_t stride, const Shape& out_shape, const PaddedMap<T>& out) {
  parallel_tasks(out_shape.batch * out_shape.height, [&](int64_t row) {
    const int64_t n = row / out_shape.height, oh = row % out_shape.height;
    const int64_t h0 = oh * stride, h1 = std::min(h0 + kernel, in_shape.height);
    for (int64_t ow = 0; ow < out_shape.width; ++ow) {
      const int64_t w0 = ow * stride, w1 = std::min(w0 + kernel, in_shape.width);
      // The `stride` columns a later step's window adds, kPoolAhead columns on.
      const int64_t ahead = w0 + kPoolAhead, bytes = stride * in.channels * sizeof(T);
      for (int64_t h = h0; h < h1 && ahead < in_shape.width; ++h) {
        const char* pixels = reinterpret_cast<const char*>(in.pixel(n, h, ahead));
        for (int64_t line = 0; line < bytes; line += 64) __builtin_prefetch(pixels + line);
      }
      pool_window(in, n, h0, h1, w0, w1, true, T(1), out.pixel(n, oh, ow));
    }
  });
}

template <typename T>
void average_head(const PaddedMap<T>& in, const Shape& s, T* features, const T* fc_w,
                  const T* fc_b, int64_t classes, T* logits) {
  const int64_t c = in.channels;
  const T inv = T(1) / static_cast<T>(s.height * s.width);
  parallel_tasks(s.batch, [&](int64_t n) {
    T* f = features + n * c;
    std::fill(f, f + c, T(0));
    for (int64_t h = 0; h < s.height; ++h) {
      for (int64_t w = 0; w < s.width; ++w) {
        const T* src = in.pixel(n, h, w);
        for_each_lane_group<T>(c, [&](auto lanes, int64_t ch) {
          using U = decltype(lanes);
          store(f + ch, load<U>(f + ch) + load<U>(src + ch));
        });
      }
    }
    for (int64_t ch = 0; ch < c; ++ch) f[ch] *= inv;
  });
  if (!fc_w) return;
  // Bias after the product: gemm's bias comes with a ReLU, the FC has none.
  const int64_t chunks = ceil_div(classes, chunk_cols<T>());
  parallel_tasks(ceil_div(s.batch, kBlockRows) * chunks, [&](int64_t task) {
    const int64_t m0 = task / chunks * kBlockRows, col = task % chunks * chunk_cols<T>();
    const int64_t rows = std::min(kBlockRows, s.batch - m0);
    const T* a_rows[kBlockRows];
    T* c_rows[kBlockRows];
    for (int64_t i = 0; i < rows; ++i) {
      a_rows[i] = features + (m0 + i) * c;
      c_rows[i] = logits + (m0 + i) * classes;
    }
    gemm(rows, a_rows, {1, c, 0}, fc_w, static_cast<const T*>(nullptr), c_rows, col,
         std::min(classes, col + chunk_cols<T>()));
  });
  for (int64_t n = 0; n < s.batch; ++n)
    for (int64_t j = 0; j < classes; ++j) logits[n * classes + j] += fc_b[j];
}

#define INSTANTIATE(T)                                                                \
  template void load_input<T>(const at::Tensor&, const T*, const PaddedMap<T>&);      \
  template void max_pool<T>(const PaddedMap<T>&, const Shape&, int64_t, int64_t,      \
                            const Shape&, const PaddedMap<T>&);                       \
  template void average_head<T>(const PaddedMap<T>&, const Shape&, T*, const T*,      \
                                const T*, int64_t, T*);
INSTANTIATE(float)
INSTANTIATE(double)
#undef INSTANTIATE

}  // namespace inception_cpu
