// Program: an Inception network's eval forward, or any run of its layers, as one call
// (program.cpp) over folded, packed weights. inception_fused/program.py builds it from
// the modules; the encoding it hands over:
//
//   ints: n_maps, then per map (channels, border, slot), then the ops, each a kind and
//   its fields:
//     kInput    dst affine                   x (any layout) into map dst, times
//                                            tensors[affine] ([2, C]: scale, shift) if >= 0
//     kConv     n, then n branches of        relu(conv + bias) of each branch into
//               kBranchInts fields           channels [dst_channel, +cols) of dst
//     kMaxPool  src dst dst_channel kernel stride ceil_mode
//     kHead     src fc_weight fc_bias        the average over src's pixels [N, C], then
//                                            (fc_weight >= 0) the FC: [N, classes]
//   A branch: src dst dst_channel kh kw stride pad_h pad_w pool weight bias col_begin
//   col_end winograd (tensor indices; winograd -1 for none; pool: Pool's value). The
//   Winograd weights' rows say which F(m x m, 3x3) runs: (m + 2)^2 * C_in, m = 2 or 4.
//
// Maps are channels_last with a zero border of `border` pixels (at least every reader's
// padding). Maps in the same slot share one buffer (the builder puts maps whose lives do
// not overlap there); slot -1 is the result, allocated per call and returned, unless the
// program ends with kHead, whose output is returned. Buffers are kept between calls and
// reallocated only when the input shape changes.
#pragma once

#include <torch/extension.h>

#include <mutex>
#include <vector>

#include "inception_cpu.h"

namespace inception_cpu {

class Program {
 public:
  enum Kind : int64_t { kInput = 0, kConv = 1, kMaxPool = 2, kHead = 3 };
  static constexpr int64_t kBranchInts = 14;

  Program(std::vector<at::Tensor> tensors, const std::vector<int64_t>& ints);
  at::Tensor forward(const at::Tensor& x);
  // The milliseconds each op of one forward of x took (the ops run as in forward).
  std::vector<double> profile(const at::Tensor& x);

 private:
  struct Map {
    int64_t channels, border, slot;
  };
  struct Branch {
    int64_t src, dst, dst_channel, kh, kw, stride, pad_h, pad_w, pool, weight, bias,
        col_begin, col_end, winograd;
    int64_t tile = 1;  // the side of the output tiles it computes: Winograd's m, 1
  };
  struct Op {
    Kind kind;
    std::vector<Branch> branches;  // kConv
    int64_t src = -1, dst = -1, dst_channel = 0, kernel = 0, stride = 0, ceil_mode = 0;
    int64_t weight = -1, bias = -1;  // kInput: weight = the affine; kHead: the FC
    int64_t classes = 0;             // kHead: the FC's outputs
  };
  // The per-shape layout of every map: its interior and its bordered extent.
  struct Layout {
    std::vector<Shape> shapes;
    std::vector<int64_t> heights, widths;  // border included
  };

  // Moves what run() reads into one arena (tensors_ becomes its pieces, the ops' tensor
  // indices theirs): biases and the affine as given, weights in gemm's panels, one
  // matrix per branch (a 1x1 group's shared matrix split at its branches' columns).
  template <typename T>
  void pack();
  Layout layout(const at::Tensor& x) const;
  template <typename T>
  at::Tensor run(const at::Tensor& x, std::vector<double>* op_ms);
  at::Tensor dispatch(const at::Tensor& x, std::vector<double>* op_ms);

  std::vector<at::Tensor> tensors_;  // views of one arena (after pack)
  std::vector<Map> maps_;
  std::vector<Op> ops_;
  at::ScalarType dtype_;
  int64_t c_in_;
  std::mutex mutex_;  // one forward at a time owns the buffers
  std::vector<at::Tensor> buffers_;
  std::vector<int64_t> buffer_sizes_;
};

}  // namespace inception_cpu
