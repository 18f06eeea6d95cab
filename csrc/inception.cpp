// One GoogLeNet Inception block's eval forward over buffers the caller holds: step 1
// (everything that reads x) then step 2 (the 3x3 / 5x5 convs), each one conv_step.
#include "inception_cpu.h"

namespace inception_cpu {

template <typename T>
void inception_forward(const InceptionBlock<T>& b, const T* x, const Shape& shape,
                       T* out, T* red3, T* red5) {
  if (shape.pixels() == 0) return;
  // The reduce maps: a k / 2 border around whole tiles of outputs (Winograd's m x m
  // tiles read rows / columns past the map's when m does not divide H or W).
  const auto reduce_map = [&](T* data, int64_t channels, int64_t k, int64_t tile) {
    const int64_t pad = k / 2;
    const PaddedMap<T> map{data, channels, pad, round_up(shape.height, tile) + 2 * pad,
                           round_up(shape.width, tile) + 2 * pad};
    zero_border(map, shape);
    return map;
  };
  const PaddedMap<T> map3 = reduce_map(red3, b.r3, b.k3, b.tile3);
  const PaddedMap<T> map5 = reduce_map(red5, b.r5, b.k5, b.tile5);
  const PaddedMap<T> input = dense_map(const_cast<T*>(x), b.c_in, shape);
  const PaddedMap<T> output = dense_map(out, b.c_out(), shape);
  const int64_t stem_cols = b.c1 + b.r3 + b.r5;
  const auto conv = [&](const PaddedMap<T>& in, int64_t k, Pool pool, Weights<T> w,
                        const T* winograd, int64_t tile, const PaddedMap<T>& dst) {
    return ConvBranch<T>{in, shape, k, k, 1, k / 2, k / 2, pool, w, winograd, tile, shape,
                         dst};
  };
  const auto stem = [&](int64_t col, int64_t cols, const PaddedMap<T>& dst) {
    return conv(input, 1, Pool::kNone, {b.stem_w + col, stem_cols, b.stem_b + col, cols},
                nullptr, 1, dst);
  };
  const ConvBranch<T> step1[4] = {
      stem(0, b.c1, output), stem(b.c1, b.r3, map3), stem(b.c1 + b.r3, b.r5, map5),
      conv(input, 1, Pool::kMax, {b.pool_w, b.c_pool, b.pool_b, b.c_pool}, nullptr, 1,
           output.slice(b.c1 + b.c3 + b.c5))};
  conv_step<T>(step1, 4);
  const ConvBranch<T> step2[2] = {
      conv(map3, b.k3, Pool::kNone, {b.w3, b.c3, b.b3, b.c3}, b.winograd3, b.tile3,
           output.slice(b.c1)),
      conv(map5, b.k5, Pool::kNone, {b.w5, b.c5, b.b5, b.c5}, b.winograd5, b.tile5,
           output.slice(b.c1 + b.c3))};
  conv_step<T>(step2, 2);
}

template void inception_forward<float>(const InceptionBlock<float>&, const float*,
                                       const Shape&, float*, float*, float*);
template void inception_forward<double>(const InceptionBlock<double>&, const double*,
                                        const Shape&, double*, double*, double*);

}  // namespace inception_cpu
