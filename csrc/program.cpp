// A Program's forward: the ops in order, each conv op one conv_step (program.h has the
// encoding). Every check that does not depend on the input runs once, when the program
// is built; the shape checks run before any op.
#include "program.h"

#include <algorithm>
#include <chrono>
#include <functional>
#include <sys/mman.h>

namespace inception_cpu {
namespace {

// `bytes` of fresh memory; from 2 MiB up it starts on a 2 MiB boundary and is advised
// to be backed by transparent huge pages (the advice may be declined: nothing depends
// on it but speed).
at::Tensor huge_page_bytes(int64_t bytes) {
  constexpr int64_t kHugePage = 2 << 20;
  if (bytes < kHugePage) return at::empty({bytes}, at::kByte);
  const int64_t size = round_up(bytes, kHugePage);
  const at::Tensor raw = at::empty({size + kHugePage}, at::kByte);
  const auto address = reinterpret_cast<uintptr_t>(raw.data_ptr());
  const at::Tensor aligned =
      raw.narrow(0, (kHugePage - address % kHugePage) % kHugePage, size);
#ifdef MADV_HUGEPAGE
  madvise(aligned.data_ptr(), size, MADV_HUGEPAGE);
#endif
  return aligned.narrow(0, 0, bytes);
}

}  // namespace

Program::Program(std::vector<at::Tensor> tensors, const std::vector<int64_t>& ints)
    : tensors_(std::move(tensors)) {
  size_t pos = 0;
  const auto next = [&]() {
    TORCH_CHECK(pos < ints.size(), "Program: the ints end early");
    return ints[pos++];
  };
  const int64_t n_maps = next();
  for (int64_t i = 0; i < n_maps; ++i) {
    const int64_t channels = next(), border = next(), slot = next();
    maps_.push_back({channels, border, slot});
  }
  const auto tensor = [&](int64_t i, int64_t dim, const char* what) -> const at::Tensor& {
    TORCH_CHECK(i >= 0 && i < static_cast<int64_t>(tensors_.size()) &&
                    tensors_[i].dim() == dim,
                "Program: ", what, " must be a ", dim, "-D tensor of the list, got index ",
                i);
    return tensors_[i];
  };
  const auto map = [&](int64_t i) -> const Map& {
    TORCH_CHECK(i >= 0 && i < n_maps, "Program: no map ", i);
    return maps_[i];
  };
  TORCH_CHECK(!tensors_.empty(), "Program: no weights");
  dtype_ = tensors_[0].scalar_type();
  TORCH_CHECK(dtype_ == at::kFloat || dtype_ == at::kDouble,
              "Program runs float32 and float64, got ", dtype_);
  for (size_t i = 0; i < tensors_.size(); ++i)
    TORCH_CHECK(tensors_[i].device().is_cpu() && tensors_[i].is_contiguous() &&
                    tensors_[i].scalar_type() == dtype_,
                "Program: tensor ", i, " must be a contiguous CPU tensor of ", dtype_);

  while (pos < ints.size()) {
    Op op{static_cast<Kind>(next())};
    switch (op.kind) {
      case kInput:
        TORCH_CHECK(ops_.empty(), "Program: the input op must come first");
        op.dst = next();
        op.weight = next();
        c_in_ = map(op.dst).channels;
        if (op.weight >= 0)
          TORCH_CHECK(tensor(op.weight, 2, "the input affine").size(1) == c_in_,
                      "Program: the input affine must be [2, ", c_in_, "]");
        break;
      case kConv: {
        const int64_t n = next();
        TORCH_CHECK(n > 0, "Program: a conv op needs branches");
        for (int64_t i = 0; i < n; ++i) {
          Branch b{};
          for (int64_t* field : {&b.src, &b.dst, &b.dst_channel, &b.kh, &b.kw, &b.stride,
                                 &b.pad_h, &b.pad_w, &b.pool, &b.weight, &b.bias,
                                 &b.col_begin, &b.col_end, &b.winograd})
            *field = next();
          const Map &src = map(b.src), &dst = map(b.dst);
          const at::Tensor& w = tensor(b.weight, 2, "a conv weight");
          TORCH_CHECK(b.kh > 0 && b.kw > 0 && b.stride > 0 && b.pad_h >= 0 &&
                          b.pad_w >= 0 && b.pad_h <= src.border &&
                          b.pad_w <= src.border && b.pool >= 0 && b.pool <= 3 &&
                          (b.pool == 0 || (b.kh == 1 && b.kw == 1 && b.stride == 1 &&
                                           b.pad_h == 0 && b.pad_w == 0)),
                      "Program: bad conv geometry (kernel ", b.kh, "x", b.kw, ", stride ",
                      b.stride, ", padding ", b.pad_h, ",", b.pad_w, ", pool ", b.pool,
                      ") over a map with border ", src.border);
          TORCH_CHECK(w.size(0) == b.kh * b.kw * src.channels && 0 <= b.col_begin &&
                          b.col_begin < b.col_end && b.col_end <= w.size(1) &&
                          tensor(b.bias, 1, "a conv bias").size(0) == w.size(1) &&
                          b.dst_channel >= 0 &&
                          b.dst_channel + b.col_end - b.col_begin <= dst.channels,
                      "Program: conv weights [", w.size(0), ", ", w.size(1),
                      "] do not fit their maps (", src.channels, " -> ", dst.channels,
                      " channels)");
          if (b.winograd >= 0) {
            const at::Tensor& u = tensor(b.winograd, 2, "Winograd weights");
            TORCH_CHECK(b.kh == 3 && b.kw == 3 && b.stride == 1 && b.col_begin == 0 &&
                            b.col_end == w.size(1) &&
                            winograd_tile_of(u.size(0), src.channels) > 0 &&
                            u.size(1) == w.size(1),
                        "Program: Winograd weights need a whole 3x3 stride-1 conv and "
                        "[(m + 2)^2 * C_in, cols] rows, m = 2 or 4");
            b.tile = winograd_tile_of(u.size(0), src.channels);
          }
          op.branches.push_back(b);
        }
        break;
      }
      case kMaxPool:
        for (int64_t* field :
             {&op.src, &op.dst, &op.dst_channel, &op.kernel, &op.stride, &op.ceil_mode})
          *field = next();
        TORCH_CHECK(op.kernel > 0 && op.stride > 0 && op.dst_channel >= 0 &&
                        op.dst_channel + map(op.src).channels <= map(op.dst).channels,
                    "Program: bad max pool");
        break;
      case kHead:
        op.src = next();
        op.weight = next();
        op.bias = next();
        if (op.weight >= 0) {
          TORCH_CHECK(tensor(op.weight, 2, "the FC weight").size(0) ==
                              map(op.src).channels &&
                          tensor(op.bias, 1, "the FC bias").size(0) ==
                              tensors_[op.weight].size(1),
                      "Program: the FC does not take ", map(op.src).channels,
                      " features");
          op.classes = tensors_[op.weight].size(1);
        }
        TORCH_CHECK(pos == ints.size(), "Program: the head must be the last op");
        break;
      default:
        TORCH_CHECK(false, "Program: unknown op ", op.kind);
    }
    ops_.push_back(std::move(op));
  }
  TORCH_CHECK(!ops_.empty() && ops_[0].kind == kInput && ops_.size() > 1,
              "Program: expected an input op and at least one more");
  const Op& last = ops_.back();
  if (last.kind != kHead) {
    const int64_t result = last.kind == kConv ? last.branches[0].dst : last.dst;
    TORCH_CHECK(maps_[result].slot == -1 && maps_[result].border == 0,
                "Program: the last op must write the result map (slot -1, no border)");
  }
  AT_DISPATCH_FLOATING_TYPES(dtype_, "inception_fused_program_pack", [&] {
    pack<scalar_t>();
  });
}

template <typename T>
void Program::pack() {
  // Pieces: their sizes (whole cache lines) and how each is filled, then one arena.
  std::vector<int64_t> sizes;
  std::vector<std::function<void(T*)>> fills;
  const auto add = [&](int64_t elements, std::function<void(T*)> fill) {
    sizes.push_back(round_up(elements, 64 / sizeof(T)));
    fills.push_back(std::move(fill));
    return static_cast<int64_t>(sizes.size()) - 1;
  };
  const auto copy = [&](int64_t i, int64_t begin, int64_t count) {
    const T* from = tensors_[i].data_ptr<T>() + begin;
    return add(count, [=](T* to) { std::copy_n(from, count, to); });
  };
  // Columns [begin, end) of each of `matrices` stacked [K, cols] matrices of tensor i.
  const auto panels = [&](int64_t i, int64_t matrices, int64_t begin, int64_t end) {
    const at::Tensor& w = tensors_[i];
    const int64_t k = w.size(0) / matrices, ldw = w.size(1);
    const int64_t each = packed_size<T>(k, end - begin);
    const T* from = w.data_ptr<T>() + begin;
    return add(matrices * each, [=](T* to) {
      for (int64_t m = 0; m < matrices; ++m)
        pack_panels(from + m * k * ldw, k, ldw, end - begin, to + m * each);
    });
  };
  for (Op& op : ops_) {
    if (op.kind == kInput && op.weight >= 0) op.weight = copy(op.weight, 0, 2 * c_in_);
    if (op.kind == kHead && op.weight >= 0) {
      op.weight = panels(op.weight, 1, 0, op.classes);
      op.bias = copy(op.bias, 0, op.classes);
    }
    for (Branch& b : op.branches) {
      const int64_t cols = b.col_end - b.col_begin, n = b.tile + 2;
      if (b.winograd >= 0) b.winograd = panels(b.winograd, n * n, 0, cols);
      b.weight = panels(b.weight, 1, b.col_begin, b.col_end);
      b.bias = copy(b.bias, b.col_begin, cols);
      b.col_begin = 0;
      b.col_end = cols;
    }
  }
  // One arena: a batch-1 forward streams tens of MB of weights from memory, and huge
  // pages spare it a TLB walk every 4 KiB.
  int64_t total = 0;
  for (int64_t size : sizes) total += size;
  const at::Tensor arena = huge_page_bytes(total * sizeof(T)).view(dtype_);
  std::vector<at::Tensor> pieces;
  total = 0;
  for (size_t i = 0; i < sizes.size(); ++i) {
    pieces.push_back(arena.narrow(0, total, sizes[i]));
    fills[i](pieces.back().data_ptr<T>());
    total += sizes[i];
  }
  tensors_ = std::move(pieces);
}

Program::Layout Program::layout(const at::Tensor& x) const {
  const int64_t batch = x.size(0);
  Layout l;
  l.shapes.assign(maps_.size(), Shape{-1, 0, 0});
  const auto set = [&](int64_t m, const Shape& s, size_t op) {
    TORCH_CHECK(s.height > 0 && s.width > 0, "inception_fused Program: input ", x.sizes(),
                " is too small: step ", op, " would have an empty output");
    Shape& t = l.shapes[m];
    TORCH_CHECK(t.batch < 0 || (t.height == s.height && t.width == s.width),
                "Program: step ", op, " writes a map of another shape");
    t = s;
  };
  std::vector<int64_t> reach_h(maps_.size(), 0), reach_w(maps_.size(), 0);
  for (size_t i = 0; i < ops_.size(); ++i) {
    const Op& op = ops_[i];
    if (op.kind == kInput) set(op.dst, {batch, x.size(2), x.size(3)}, i);
    if (op.kind == kMaxPool) {
      const Shape& in = l.shapes[op.src];
      set(op.dst,
          {batch, pooled_size(in.height, op.kernel, op.stride, op.ceil_mode),
           pooled_size(in.width, op.kernel, op.stride, op.ceil_mode)},
          i);
    }
    for (const Branch& b : op.branches) {
      const Shape& in = l.shapes[b.src];
      const Shape out{batch, conv_size(in.height, b.kh, b.stride, b.pad_h),
                      conv_size(in.width, b.kw, b.stride, b.pad_w)};
      set(b.dst, out, i);
      const int64_t tile = b.tile;
      reach_h[b.src] = std::max(reach_h[b.src], reach_past(in.height, out.height, b.kh,
                                                           b.stride, b.pad_h, tile));
      reach_w[b.src] = std::max(reach_w[b.src], reach_past(in.width, out.width, b.kw,
                                                           b.stride, b.pad_w, tile));
    }
  }
  for (size_t m = 0; m < maps_.size(); ++m) {
    const int64_t border = maps_[m].border;
    l.heights.push_back(border + l.shapes[m].height + std::max(border, reach_h[m]));
    l.widths.push_back(border + l.shapes[m].width + std::max(border, reach_w[m]));
  }
  return l;
}

at::Tensor Program::forward(const at::Tensor& x) { return dispatch(x, nullptr); }

std::vector<double> Program::profile(const at::Tensor& x) {
  std::vector<double> op_ms;
  dispatch(x, &op_ms);
  return op_ms;
}

at::Tensor Program::dispatch(const at::Tensor& x, std::vector<double>* op_ms) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && x.scalar_type() == dtype_ &&
                  x.size(1) == c_in_,
              "inception_fused Program.forward: expected a 4-D ", dtype_,
              " CPU tensor with ", c_in_, " channels, got ", x.sizes(), " ",
              x.scalar_type(), " on ", x.device());
  std::lock_guard<std::mutex> lock(mutex_);  // the buffers are the program's
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(dtype_, "inception_fused_program", [&] {
    out = run<scalar_t>(x, op_ms);
  });
  return out;
}

template <typename T>
at::Tensor Program::run(const at::Tensor& x, std::vector<double>* op_ms) {
  const Layout l = layout(x);
  const int64_t batch = x.size(0);
  const auto elements = [&](size_t m) {
    return batch * l.heights[m] * l.widths[m] * maps_[m].channels;
  };
  // The input map is x itself when x already is its layout (channels_last, no border).
  const Op& input = ops_[0];
  const bool alias_input =
      input.weight < 0 && l.heights[input.dst] == x.size(2) &&
      l.widths[input.dst] == x.size(3) && x.is_contiguous(at::MemoryFormat::ChannelsLast);

  std::vector<int64_t> sizes;
  for (size_t m = 0; m < maps_.size(); ++m) {
    const int64_t slot = maps_[m].slot;
    if (slot < 0 || (alias_input && m == static_cast<size_t>(input.dst))) continue;
    if (static_cast<int64_t>(sizes.size()) <= slot) sizes.resize(slot + 1, 0);
    sizes[slot] = std::max(sizes[slot], elements(m));
  }
  if (buffers_.empty() || buffer_sizes_ != sizes) {
    buffers_.clear();
    for (int64_t n : sizes)
      buffers_.push_back(huge_page_bytes(n * x.element_size()).view(x.scalar_type()));
    buffer_sizes_ = sizes;
  }
  at::Tensor result;
  const Op& last = ops_.back();
  std::vector<PaddedMap<T>> maps;
  for (size_t m = 0; m < maps_.size(); ++m) {
    T* data = nullptr;
    const Shape& s = l.shapes[m];
    if (alias_input && m == static_cast<size_t>(input.dst)) {
      data = const_cast<T*>(x.data_ptr<T>());  // read only: only kInput writes it
    } else if (maps_[m].slot >= 0) {
      data = buffers_[maps_[m].slot].data_ptr<T>();
    } else if (last.kind != kHead) {
      result = at::empty({batch, maps_[m].channels, s.height, s.width},
                         x.options().memory_format(at::MemoryFormat::ChannelsLast));
      data = result.data_ptr<T>();
    }
    maps.push_back({data, maps_[m].channels, maps_[m].border, l.heights[m], l.widths[m]});
  }
  if (batch == 0) {
    if (last.kind != kHead) return result;
    const int64_t width = last.weight >= 0 ? last.classes : maps_[last.src].channels;
    return at::empty({0, width}, x.options());
  }
  // Borders are zeroed before the first op that writes their map (slots are shared).
  std::vector<bool> written(maps_.size(), false);
  const auto first_write = [&](int64_t m) {
    if (written[m]) return;
    written[m] = true;
    if (l.heights[m] != l.shapes[m].height || l.widths[m] != l.shapes[m].width)
      zero_border(maps[m], l.shapes[m]);
  };
  const auto ptr = [&](int64_t i) { return tensors_[i].data_ptr<T>(); };

  std::vector<ConvBranch<T>> branches;
  for (const Op& op : ops_) {
    const auto start = op_ms ? std::chrono::steady_clock::now()
                             : std::chrono::steady_clock::time_point{};
    switch (op.kind) {
      case kInput:
        written[op.dst] = true;
        if (!alias_input)
          load_input<T>(x, op.weight >= 0 ? ptr(op.weight) : nullptr, maps[op.dst]);
        break;
      case kConv:
        branches.clear();
        for (const Branch& b : op.branches) {
          first_write(b.dst);
          branches.push_back(
              {maps[b.src], l.shapes[b.src], b.kh, b.kw, b.stride, b.pad_h, b.pad_w,
               static_cast<Pool>(b.pool), {ptr(b.weight), ptr(b.bias), b.col_end},
               b.winograd >= 0 ? ptr(b.winograd) : nullptr, b.tile,
               l.shapes[b.dst],
               maps[b.dst].slice(b.dst_channel)});
        }
        conv_step<T>(branches.data(), static_cast<int64_t>(branches.size()));
        break;
      case kMaxPool:
        first_write(op.dst);
        max_pool(maps[op.src], l.shapes[op.src], op.kernel, op.stride, l.shapes[op.dst],
                 maps[op.dst].slice(op.dst_channel));
        break;
      case kHead: {
        const int64_t c = maps_[op.src].channels;
        at::Tensor features = at::empty({batch, c}, x.options());
        if (op.weight < 0) {
          average_head<T>(maps[op.src], l.shapes[op.src], features.data_ptr<T>(), nullptr,
                          nullptr, 0, nullptr);
          result = features;
          break;
        }
        result = at::empty({batch, op.classes}, x.options());
        average_head<T>(maps[op.src], l.shapes[op.src], features.data_ptr<T>(),
                        ptr(op.weight), ptr(op.bias), op.classes, result.data_ptr<T>());
        break;
      }
    }
    if (op_ms) {
      const std::chrono::duration<double, std::milli> took =
          std::chrono::steady_clock::now() - start;
      op_ms->push_back(took.count());
    }
  }
  return result;
}

}  // namespace inception_cpu
