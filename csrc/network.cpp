// The whole GoogLeNet eval forward as one call over a network plan (network.py decides
// the plan: BN folded into every conv, weights packed, Winograd transforms made):
//
//   input (any layout, optional transform_input affine) -> zero-bordered NHWC
//   conv1 7x7/2 + bias + ReLU (implicit GEMM over the bordered input)
//   maxpool 3x3/2 -> conv2 1x1 + ReLU (into conv3's zero-bordered map)
//   conv3 3x3 + ReLU (Winograd) -> maxpool 3x3/2
//   Inception blocks, each followed by an optional stride-2 max pool (ceil_mode)
//   average pool -> (eval) dropout = identity -> FC + bias
//
// Everything runs channels_last in buffers the plan holds between calls (reallocated
// only when the input shape changes); the only allocation per call is the logits.
#include "network.h"

#include <limits>

namespace inception_cpu {
namespace {

// Output size of a ceil_mode max pool without padding, as PyTorch computes it (the
// last window must start inside the input; it may hang over the edge). 0: too small.
int64_t pooled_size(int64_t size, int64_t kernel, int64_t stride) {
  if (size - kernel + stride - 1 < 0) return 0;
  int64_t out = (size - kernel + stride - 1) / stride + 1;
  if ((out - 1) * stride >= size) --out;
  return out;
}

// out = max over kernel x kernel windows (stride `stride`, clipped at the bottom / right
// edge as ceil_mode does) of an NHWC map; a NaN in a window gives NaN.
template <typename T>
void max_pool(const T* x, const Shape& in, int64_t channels, int64_t kernel,
              int64_t stride, const Shape& out_shape, T* out) {
  parallel_tasks(out_shape.batch * out_shape.height, [&](int64_t row) {
    const int64_t n = row / out_shape.height, oh = row % out_shape.height;
    const int64_t h0 = oh * stride, h1 = std::min(h0 + kernel, in.height);
    for (int64_t ow = 0; ow < out_shape.width; ++ow) {
      const int64_t w0 = ow * stride, w1 = std::min(w0 + kernel, in.width);
      T* dst = out + ((n * out_shape.height + oh) * out_shape.width + ow) * channels;
      std::copy_n(x + ((n * in.height + h0) * in.width + w0) * channels, channels, dst);
      for (int64_t h = h0; h < h1; ++h) {
        for (int64_t w = h == h0 ? w0 + 1 : w0; w < w1; ++w) {
          const T* src = x + ((n * in.height + h) * in.width + w) * channels;
          for_each_lane_group<T>(channels, [&](auto lanes, int64_t c) {
            using U = decltype(lanes);
            store(dst + c, nan_max(load<U>(dst + c), load<U>(src + c)));
          });
        }
      }
    }
  });
}

// relu(A @ B + bias) for `pixels` output rows in parallel blocks x column chunks; rows(m0,
// count, a_rows, c_rows) fills the row pointers of pixels m0 ... m0 + count - 1.
template <typename T, typename Rows>
void gemm_step(int64_t pixels, const KLayout& kl, const Weights<T>& wt,
               const Rows& rows) {
  const int64_t chunks = ceil_div(wt.cols, chunk_cols<T>());
  parallel_tasks(ceil_div(pixels, kBlockRows) * chunks, [&](int64_t task) {
    const int64_t m0 = task / chunks * kBlockRows;
    const int64_t col = task % chunks * chunk_cols<T>();
    const int64_t count = std::min(kBlockRows, pixels - m0);
    const T* a_rows[kBlockRows];
    T* c_rows[kBlockRows];
    rows(m0, count, a_rows, c_rows);
    gemm(count, a_rows, kl, wt.w, wt.ldb, wt.bias, c_rows, col,
         std::min(wt.cols, col + chunk_cols<T>()));
  });
}

}  // namespace

NetworkPlan::NetworkPlan(std::vector<at::Tensor> tensors, std::vector<int64_t> ints)
    : tensors_(std::move(tensors)), ints_(std::move(ints)) {
  TORCH_CHECK(tensors_.size() >= kStemTensors + 2 &&
                  (tensors_.size() - kStemTensors - 2) % kBlockTensors == 0,
              "NetworkPlan: expected ", kStemTensors, " stem tensors, ", kBlockTensors,
              " per block and 2 head tensors, got ", tensors_.size());
  blocks_ = static_cast<int64_t>((tensors_.size() - kStemTensors - 2) / kBlockTensors);
  TORCH_CHECK(static_cast<int64_t>(ints_.size()) == kBlockInts * blocks_,
              "NetworkPlan: expected ", kBlockInts, " ints per block");
  const at::Tensor& w1 = tensors_[1];
  dtype_ = w1.scalar_type();
  TORCH_CHECK(dtype_ == at::kFloat || dtype_ == at::kDouble,
              "NetworkPlan runs float32 and float64, got ", dtype_);
  for (size_t i = 0; i < tensors_.size(); ++i) {
    const at::Tensor& t = tensors_[i];
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() &&
                    (t.numel() == 0 || t.scalar_type() == dtype_),
                "NetworkPlan: tensor ", i, " must be a contiguous CPU tensor of ",
                dtype_);
  }
  c_in_ = tensors_[0].numel() ? tensors_[0].size(1) : w1.size(0) / 49;
  TORCH_CHECK(w1.dim() == 2 && w1.size(0) == 49 * c_in_ && tensors_[2].numel() == w1.size(1),
              "NetworkPlan: conv1 must be a packed 7x7 conv over ", c_in_, " channels");
  int64_t c = w1.size(1);
  for (int s : {3, 5}) {  // conv2 (1x1), conv3 (3x3)
    TORCH_CHECK(tensors_[s].size(0) == c * (s == 3 ? 1 : 9) &&
                    tensors_[s + 1].numel() == tensors_[s].size(1),
                "NetworkPlan: stem conv weights do not chain");
    c = tensors_[s].size(1);
  }
  for (int64_t b = 0; b < blocks_; ++b) {
    const InceptionBlock<float> blk = block<float>(b, c);
    TORCH_CHECK(blk.r5 > 0 && tensors_[block_tensor(b, 0)].size(0) == c,
                "NetworkPlan: block ", b, " does not take ", c, " channels");
    c = blk.c_out();
  }
  TORCH_CHECK(tensors_[tensors_.size() - 2].size(0) == c,
              "NetworkPlan: the FC does not take ", c, " features");
}

template <typename T>
InceptionBlock<T> NetworkPlan::block(int64_t b, int64_t c_in) const {
  const auto t = [&](int i) -> const T* {
    const at::Tensor& u = tensors_[block_tensor(b, i)];
    // Never dereferenced for float vs double mismatch: the plan holds one dtype.
    return u.numel() ? static_cast<const T*>(u.data_ptr()) : nullptr;
  };
  const int64_t* v = ints_.data() + kBlockInts * b;
  const int64_t c1 = v[0], r3 = v[1], k3 = v[2], k5 = v[3];
  const int64_t stem_cols = tensors_[block_tensor(b, 0)].size(1);
  return {c_in, c1, r3, stem_cols - c1 - r3,
          tensors_[block_tensor(b, 4)].size(1), tensors_[block_tensor(b, 6)].size(1),
          tensors_[block_tensor(b, 2)].size(1), k3, k5,
          t(0), t(1), t(2), t(3), t(4), t(5), t(6), t(7), t(8), t(9)};
}

at::Tensor NetworkPlan::forward(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && x.scalar_type() == dtype_ &&
                  x.size(1) == c_in_,
              "NetworkPlan.forward: expected a 4-D ", dtype_, " CPU tensor with ", c_in_,
              " channels, got ", x.sizes(), " ", x.scalar_type(), " on ", x.device());
  std::lock_guard<std::mutex> lock(mutex_);  // the buffers are the plan's
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(dtype_, "inception_fused_network", [&] {
    out = run<scalar_t>(x);
  });
  return out;
}

template <typename T>
at::Tensor NetworkPlan::run(const at::Tensor& x) {
  const int64_t batch = x.size(0);
  // Shapes of every stage, checked before anything runs.
  const Shape input{batch, x.size(2), x.size(3)};
  const auto pooled = [&](const Shape& in, int64_t kernel, const char* where) {
    const Shape out{batch, pooled_size(in.height, kernel, 2), pooled_size(in.width, kernel, 2)};
    TORCH_CHECK(out.height > 0 && out.width > 0, "NetworkPlan.forward: input ",
                x.sizes(), " is too small for the max pool ", where);
    return out;
  };
  const Shape s1{batch, (input.height - 1) / 2 + 1, (input.width - 1) / 2 + 1};
  const Shape s2 = pooled(s1, 3, "after conv1");
  std::vector<Shape> block_shapes;
  Shape s = pooled(s2, 3, "after conv3");
  for (int64_t b = 0; b < blocks_; ++b) {
    block_shapes.push_back(s);
    const int64_t k = ints_[kBlockInts * b + 4];
    if (k) s = pooled(s, k, "after a block");
  }

  const at::Tensor &transform = tensors_[0], &w1 = tensors_[1], &w2 = tensors_[3],
                   &w3 = tensors_[5];
  const int64_t c1 = w1.size(1), c2 = w2.size(1), c3 = w3.size(1);
  const MapDims in_dims{input.height + 6, input.width + 6};  // conv1's padding 3
  const bool winograd3 = tensors_[7].numel() > 0;
  const MapDims conv3_dims = padded_dims(s2, 3, winograd3);

  // Buffers: sized for this shape once, kept while the shape repeats.
  int64_t act = std::max({s1.pixels() * c1, s2.pixels() * c3}), red3 = 0, red5 = 0;
  int64_t c = c3;
  for (int64_t b = 0; b < blocks_; ++b) {
    const InceptionBlock<T> blk = block<T>(b, c);
    const Shape& bs = block_shapes[b];
    act = std::max(act, bs.pixels() * blk.c_out());
    red3 = std::max(red3, blk.map3(bs).elements(bs, blk.r3));
    red5 = std::max(red5, blk.map5(bs).elements(bs, blk.r5));
    c = blk.c_out();
  }
  const std::vector<int64_t> sizes = {in_dims.elements(input, c_in_), act, act,
                                      conv3_dims.elements(s2, c2), red3, red5,
                                      batch * c};
  if (buffers_.empty() || buffers_[0].scalar_type() != dtype_ || buffer_sizes_ != sizes) {
    buffers_.clear();
    for (int64_t n : sizes) buffers_.push_back(at::empty({n}, x.options()));
    buffer_sizes_ = sizes;
  }
  T* padded_in = buffers_[0].data_ptr<T>();
  T* ping = buffers_[1].data_ptr<T>();
  T* pong = buffers_[2].data_ptr<T>();
  T* conv3_in = buffers_[3].data_ptr<T>();
  T* scratch3 = buffers_[4].data_ptr<T>();
  T* scratch5 = buffers_[5].data_ptr<T>();
  T* features = buffers_[6].data_ptr<T>();
  const auto weights = [&](int i) {
    const at::Tensor& w = tensors_[i];
    return Weights<T>{w.data_ptr<T>(), w.size(1), tensors_[i + 1].data_ptr<T>(),
                      w.size(1)};
  };

  // Input -> NHWC with conv1's zero border, transform_input's affine applied (read
  // through strides: any layout).
  {
    const T* src = x.data_ptr<T>();
    const int64_t sn = x.stride(0), sc = x.stride(1), sh = x.stride(2), sw = x.stride(3);
    const T* affine = transform.numel() ? transform.data_ptr<T>() : nullptr;
    parallel_tasks(batch * in_dims.height, [&](int64_t row) {
      const int64_t n = row / in_dims.height, h = row % in_dims.height - 3;
      T* dst = padded_in + row * in_dims.width * c_in_;
      std::fill(dst, dst + in_dims.width * c_in_, T(0));
      if (h < 0 || h >= input.height) return;
      for (int64_t w = 0; w < input.width; ++w) {
        for (int64_t ch = 0; ch < c_in_; ++ch) {
          const T v = src[n * sn + ch * sc + h * sh + w * sw];
          dst[(w + 3) * c_in_ + ch] = affine ? v * affine[ch] + affine[c_in_ + ch] : v;
        }
      }
    });
  }

  // conv1 7x7/2: output pixel (h, w)'s window starts at bordered (2h, 2w) and is 7 runs
  // of 7 * C contiguous elements.
  gemm_step<T>(s1.pixels(), {7, 7 * c_in_, in_dims.width * c_in_}, weights(1),
               [&](int64_t m0, int64_t count, const T** a, T** o) {
                 for_each_pixel(s1, m0, count, [&](int64_t i, int64_t n, int64_t h,
                                                   int64_t w) {
                   a[i] = padded_in + ((n * in_dims.height + 2 * h) * in_dims.width +
                                       2 * w) * c_in_;
                   o[i] = ping + (m0 + i) * c1;
                 });
               });
  max_pool(ping, s1, c1, 3, 2, s2, pong);

  // conv2 1x1 into the interior of conv3's zero-bordered map, then conv3.
  const PaddedMap<T> conv3_map{conv3_in, c2, 1, conv3_dims.height, conv3_dims.width};
  zero_border(conv3_map, s2);
  gemm_step<T>(s2.pixels(), {1, c1, 0}, weights(3),
               [&](int64_t m0, int64_t count, const T** a, T** o) {
                 for_each_pixel(s2, m0, count, [&](int64_t i, int64_t n, int64_t h,
                                                   int64_t w) {
                   a[i] = pong + (m0 + i) * c1;
                   o[i] = conv3_map.pixel(n, h, w);
                 });
               });
  const SpatialBranch<T> conv3{conv3_map, 3, weights(5),
                               winograd3 ? tensors_[7].data_ptr<T>() : nullptr,
                               {ping, c3}};
  spatial_step<T>(s2, &conv3, 1);
  max_pool(ping, s2, c3, 3, 2, block_shapes.empty() ? s : block_shapes[0], pong);

  // The blocks, ping-ponging; a stride-2 max pool where the plan says.
  c = c3;
  for (int64_t b = 0; b < blocks_; ++b) {
    const InceptionBlock<T> blk = block<T>(b, c);
    const Shape& bs = block_shapes[b];
    inception_forward(blk, pong, bs, ping, scratch3, scratch5);
    c = blk.c_out();
    const int64_t k = ints_[kBlockInts * b + 4];
    if (k) {
      const Shape next = b + 1 < blocks_ ? block_shapes[b + 1] : s;
      max_pool(ping, bs, c, k, 2, next, pong);
    } else {
      std::swap(ping, pong);
    }
  }

  // Head: global average pool, then FC + bias (dropout is the identity in eval).
  const T inv = T(1) / static_cast<T>(s.height * s.width);
  parallel_tasks(batch, [&](int64_t n) {
    T* f = features + n * c;
    std::fill(f, f + c, T(0));
    for (int64_t p = 0; p < s.height * s.width; ++p) {
      const T* src = pong + (n * s.height * s.width + p) * c;
      for_each_lane_group<T>(c, [&](auto lanes, int64_t ch) {
        using U = decltype(lanes);
        store(f + ch, load<U>(f + ch) + load<U>(src + ch));
      });
    }
    for (int64_t ch = 0; ch < c; ++ch) f[ch] *= inv;
  });
  const at::Tensor &fc_w = tensors_[tensors_.size() - 2], &fc_b = tensors_.back();
  const int64_t classes = fc_w.size(1);
  at::Tensor logits = at::empty({batch, classes}, x.options());
  T* o = logits.data_ptr<T>();
  // Bias after the product: gemm's bias comes with a ReLU, the FC has none.
  gemm_step<T>(batch, {1, c, 0}, {fc_w.data_ptr<T>(), classes, nullptr, classes},
               [&](int64_t m0, int64_t count, const T** a, T** out_rows) {
                 for (int64_t i = 0; i < count; ++i) {
                   a[i] = features + (m0 + i) * c;
                   out_rows[i] = o + (m0 + i) * classes;
                 }
               });
  const T* bias = fc_b.data_ptr<T>();
  for (int64_t n = 0; n < batch; ++n)
    for (int64_t j = 0; j < classes; ++j) o[n * classes + j] += bias[j];
  return logits;
}

}  // namespace inception_cpu
