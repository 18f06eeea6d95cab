// One Inception block's eval forward over buffers the caller holds: step 1 (everything
// that reads x) then step 2 (the spatial convs), each one parallel region.
#include "inception_cpu.h"

namespace inception_cpu {

template <typename T>
void inception_forward(const InceptionBlock<T>& b, const T* x, const Shape& shape,
                       T* out, T* red3, T* red5) {
  if (shape.pixels() == 0) return;
  const MapDims d3 = b.map3(shape), d5 = b.map5(shape);
  const PaddedMap<T> map3{red3, b.r3, b.k3 / 2, d3.height, d3.width};
  const PaddedMap<T> map5{red5, b.r5, b.k5 / 2, d5.height, d5.width};
  const int64_t c_out = b.c_out(), stem_cols = b.c1 + b.r3 + b.r5;
  const auto stem = [&](int64_t col, int64_t cols) {
    return Weights<T>{b.stem_w + col, stem_cols, b.stem_b + col, cols};
  };
  pointwise_step<T>(x, shape, b.c_in, stem(0, b.c1), stem(b.c1, b.r3),
                    stem(b.c1 + b.r3, b.r5), {b.pool_w, b.c_pool, b.pool_b, b.c_pool},
                    {out, c_out}, {out + b.c1 + b.c3 + b.c5, c_out}, map3, map5);
  const SpatialBranch<T> branches[2] = {
      {map3, b.k3, {b.w3, b.c3, b.b3, b.c3}, b.winograd3, {out + b.c1, c_out}},
      {map5, b.k5, {b.w5, b.c5, b.b5, b.c5}, b.winograd5, {out + b.c1 + b.c3, c_out}}};
  spatial_step<T>(shape, branches, 2);
}

template void inception_forward<float>(const InceptionBlock<float>&, const float*,
                                       const Shape&, float*, float*, float*);
template void inception_forward<double>(const InceptionBlock<double>&, const double*,
                                        const Shape&, double*, double*, double*);

}  // namespace inception_cpu
