// NetworkPlan: GoogLeNet's eval forward over folded, packed weights, run as one call
// (network.cpp). Built once per fold by inception_fused/network.py, which documents
// the tensor order:
//   [0] transform_input affine [2, C_in] (scale row, shift row) or an empty tensor
//   [1, 2] conv1 7x7/2 packed [49 C_in, c1] + bias; [3, 4] conv2 1x1; [5, 6] conv3 3x3;
//   [7] conv3's Winograd weights or empty;
//   per block kBlockTensors: stem_w, stem_b, pool_w, pool_b, w3, b3, w5, b5,
//   winograd_w3 or empty, winograd_w5 or empty;
//   last two: FC weight packed [features, classes] and bias.
// ints, kBlockInts per block: c1, r3, k3, k5, and the max pool after it (kernel 2 or 3,
// stride 2, ceil_mode; 0 for none).
#pragma once

#include <torch/extension.h>

#include <mutex>
#include <vector>

#include "inception_cpu.h"

namespace inception_cpu {

class NetworkPlan {
 public:
  static constexpr size_t kStemTensors = 8;
  static constexpr size_t kBlockTensors = 10;
  static constexpr int64_t kBlockInts = 5;

  NetworkPlan(std::vector<at::Tensor> tensors, std::vector<int64_t> ints);
  // Logits [N, classes] of x [N, C_in, H, W] (any memory layout).
  at::Tensor forward(const at::Tensor& x);

 private:
  size_t block_tensor(int64_t b, int i) const { return kStemTensors + kBlockTensors * b + i; }
  template <typename T>
  InceptionBlock<T> block(int64_t b, int64_t c_in) const;
  template <typename T>
  at::Tensor run(const at::Tensor& x);

  std::vector<at::Tensor> tensors_;
  std::vector<int64_t> ints_;
  int64_t blocks_, c_in_;
  at::ScalarType dtype_;
  std::mutex mutex_;  // one forward at a time owns the buffers
  std::vector<at::Tensor> buffers_;
  std::vector<int64_t> buffer_sizes_;
};

}  // namespace inception_cpu
