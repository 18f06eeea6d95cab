// Python entry point of the CPU backend: checks the folded weights, allocates the
// channels_last output and the zero-bordered reduce maps, runs the two steps.
#include <torch/extension.h>

#include <chrono>
#include <cmath>
#include <numeric>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "inception_cpu.h"
#include "program.h"

namespace inception_cpu {
namespace {

void check_weight(const at::Tensor& t, const char* name, const at::Tensor& x,
                  int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == x.scalar_type() &&
                  t.is_contiguous() && t.dim() == dim,
              "inception_fused CPU backend: ", name, " must be a contiguous ", dim,
              "-D CPU tensor of dtype ", x.scalar_type(), ", got ", t.sizes(), " ",
              t.scalar_type(), " on ", t.device());
}

// The m of a 3x3 branch's Winograd weights u (0 when they fit no m), 1 without them.
int64_t winograd_tile(const std::optional<at::Tensor>& u, const at::Tensor& w) {
  return u.has_value() ? winograd_tile_of(u->size(0), w.size(0) / 9) : 1;
}

at::Tensor eval_forward(const at::Tensor& x_in, const at::Tensor& stem_w,
                        const at::Tensor& stem_b, const at::Tensor& pool_w,
                        const at::Tensor& pool_b, const at::Tensor& w3,
                        const at::Tensor& b3, const at::Tensor& w5, const at::Tensor& b5,
                        int64_t c1, int64_t r3, int64_t k3, int64_t k5,
                        const std::optional<at::Tensor>& winograd_w3,
                        const std::optional<at::Tensor>& winograd_w5) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.dim() == 4,
              "inception_fused CPU backend: expected a 4-D CPU tensor, got ",
              x_in.sizes(), " on ", x_in.device());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
              "inception_fused CPU backend runs float32 and float64, got ",
              x_in.scalar_type());
  check_weight(stem_w, "stem_w", x_in, 2);
  check_weight(pool_w, "pool_w", x_in, 2);
  check_weight(w3, "w3", x_in, 2);
  check_weight(w5, "w5", x_in, 2);
  // Every bias as long as its weight has columns: the kernels read `cols` of each.
  for (auto [b, w, name] : {std::tuple{&stem_b, &stem_w, "stem_b"},
                            std::tuple{&pool_b, &pool_w, "pool_b"},
                            std::tuple{&b3, &w3, "b3"}, std::tuple{&b5, &w5, "b5"}}) {
    check_weight(*b, name, x_in, 1);
    TORCH_CHECK(b->size(0) == w->size(1), "inception_fused CPU backend: ", name,
                " has ", b->size(0), " elements, its weight has ", w->size(1),
                " output channels");
  }
  for (auto [u, w, k, name] :
       {std::tuple{&winograd_w3, &w3, k3, "winograd_w3"},
        std::tuple{&winograd_w5, &w5, k5, "winograd_w5"}}) {
    if (!u->has_value()) continue;
    check_weight(**u, name, x_in, 2);
    TORCH_CHECK(k == 3 && winograd_tile(*u, *w) > 0 &&
                    (*u)->size(1) == w->size(1),
                "inception_fused CPU backend: ", name,
                " must be winograd_weights() of a 3x3 branch's weights");
  }
  const int64_t c_in = x_in.size(1), r5 = stem_w.size(1) - c1 - r3;
  const int64_t c3 = w3.size(1), c5 = w5.size(1), c_pool = pool_w.size(1);
  TORCH_CHECK(c1 >= 0 && r3 > 0 && r5 > 0 && k3 > 0 && k5 > 0,
              "inception_fused CPU backend: bad split of stem_w's ", stem_w.size(1),
              " columns (c1 ", c1, ", r3 ", r3, ", r5 ", r5, ") or kernel sizes (", k3,
              ", ", k5, ")");
  TORCH_CHECK(stem_w.size(0) == c_in && pool_w.size(0) == c_in &&
                  w3.size(0) == k3 * k3 * r3 && w5.size(0) == k5 * k5 * r5 &&
                  k3 % 2 == 1 && k5 % 2 == 1,
              "inception_fused CPU backend: folded weights do not fit an input with ",
              c_in, " channels");

  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const Shape shape{x.size(0), x.size(2), x.size(3)};
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "inception_fused_cpu_eval", [&] {
    using T = scalar_t;
    const auto ptr = [](const std::optional<at::Tensor>& t) {
      return t.has_value() ? t->data_ptr<T>() : nullptr;
    };
    const InceptionBlock<T> block{
        c_in, c1, r3, r5, c3, c5, c_pool, k3, k5,
        stem_w.data_ptr<T>(), stem_b.data_ptr<T>(), pool_w.data_ptr<T>(),
        pool_b.data_ptr<T>(), w3.data_ptr<T>(), b3.data_ptr<T>(), w5.data_ptr<T>(),
        b5.data_ptr<T>(), ptr(winograd_w3), ptr(winograd_w5),
        winograd_tile(winograd_w3, w3), winograd_tile(winograd_w5, w5)};
    out = at::empty({shape.batch, block.c_out(), shape.height, shape.width},
                    x.options().memory_format(at::MemoryFormat::ChannelsLast));
    const at::Tensor red3 = at::empty({block.map3(shape)}, x.options());
    const at::Tensor red5 = at::empty({block.map5(shape)}, x.options());
    inception_forward(block, x.data_ptr<T>(), shape, out.data_ptr<T>(),
                      red3.data_ptr<T>(), red5.data_ptr<T>());
  });
  return out;
}

}  // namespace

at::Tensor winograd_weights_tensor(const at::Tensor& w, int64_t m) {
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.is_contiguous() &&
                  w.size(0) % 9 == 0 &&
                  (w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble),
              "winograd_weights: expected packed 3x3 weights [9 * C, cols], contiguous "
              "float32/float64 on CPU, got ", w.sizes(), " ", w.scalar_type());
  TORCH_CHECK(m == 2 || m == 4, "winograd_weights: m must be 2 or 4, got ", m);
  const int64_t c_in = w.size(0) / 9;
  at::Tensor u = at::empty({(m + 2) * (m + 2) * c_in, w.size(1)}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "inception_fused_winograd_weights", [&] {
    winograd_weights<scalar_t>(w.data_ptr<scalar_t>(), c_in, w.size(1), m,
                               u.data_ptr<scalar_t>());
  });
  return u;
}

// Whether this CPU (and OS) runs a build's instructions: "avx2" (AVX2 + FMA) or
// "avx512" (F/BW/VL/DQ + FMA). Asked of the baseline build before another is imported,
// since torch's capability can be forced past what the CPU runs.
bool cpu_runs(const std::string& isa) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == "avx2") return avx2;
  if (isa == "avx512")
    return avx2 && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq");
#endif
  return false;
}

// The fp32 multiply-add rate this build's vectors reach on torch's threads, in GFLOP/s:
// each thread runs kChains independent a * m + c chains (FMAs where the build has them;
// enough chains to cover two pipes' latency) for `steps` steps, 2 flops a lane each.
// What the benchmarks report a fraction of: the clock a VM really gives, not its label.
double fp32_peak_gflops(int64_t steps) {
  using V = Simd<float>::type;
  constexpr int kChains = 12;  // 12 + 2 constants fit AVX2's 16 registers
  const int64_t threads = at::get_num_threads();
  std::vector<float> sinks(threads);
  const auto start = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      V acc[kChains];
      for (int i = 0; i < kChains; ++i) acc[i] = V{} + (1.0f + 1e-3f * i);
      const V mul = V{} + 0.999999f, add = V{} + 1e-6f;
      for (int64_t step = 0; step < steps; ++step)
        for (V& a : acc) a = a * mul + add;
      for (const V& a : acc) sinks[t] += lane_sum<float>(a);  // keeps the chains live
    }
  });
  const std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
  TORCH_CHECK(std::isfinite(std::accumulate(sinks.begin(), sinks.end(), 0.0f)));
  return 2.0 * kChains * Simd<float>::width * steps * threads / took.count() / 1e9;
}

}  // namespace inception_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "inception_fused CPU backend: the fused eval forward in C++ and OpenMP";
  m.def("eval_forward", &inception_cpu::eval_forward,
        "Eval-mode Inception over BN-folded, packed weights (see folding.py); returns "
        "a channels_last output",
        pybind11::arg("x"), pybind11::arg("stem_w"), pybind11::arg("stem_b"),
        pybind11::arg("pool_w"), pybind11::arg("pool_b"), pybind11::arg("w3"),
        pybind11::arg("b3"), pybind11::arg("w5"), pybind11::arg("b5"), pybind11::arg("c1"),
        pybind11::arg("r3"), pybind11::arg("k3"), pybind11::arg("k5"),
        pybind11::arg("winograd_w3") = pybind11::none(),
        pybind11::arg("winograd_w5") = pybind11::none(),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  // module_local: every build defines this type; a process that imports two must not
  // register it twice.
  pybind11::class_<inception_cpu::Program>(
      m, "Program", pybind11::module_local(),
      "An Inception network's eval forward, or a run of its layers, as one call over "
      "folded, packed weights (program.h documents the encoding; "
      "inception_fused/program.py builds it)")
      .def(pybind11::init<std::vector<at::Tensor>, const std::vector<int64_t>&>(),
           pybind11::arg("tensors"), pybind11::arg("ints"))
      .def("forward", &inception_cpu::Program::forward, pybind11::arg("x"),
           pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("profile", &inception_cpu::Program::profile,
           "One forward of x: the milliseconds each op took, in order",
           pybind11::arg("x"), pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("cpu_runs", &inception_cpu::cpu_runs,
        "Whether this CPU runs the 'avx2' or 'avx512' build", pybind11::arg("isa"));
  m.def("vector_bits", [] { return 8 * inception_cpu::kVectorBytes; },
        "This build's SIMD vector width in bits");
  m.def("fp32_peak_gflops", &inception_cpu::fp32_peak_gflops,
        "Measured fp32 multiply-add GFLOP/s of this build's vectors on torch's threads",
        pybind11::arg("steps") = 50'000'000,
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("winograd_weights", &inception_cpu::winograd_weights_tensor,
        "Winograd F(m x m, 3x3) transform G g G^T of packed 3x3 weights [9 C, cols] -> "
        "[(m + 2)^2 C, cols] (row = xi * C + c), m = 2 or 4",
        pybind11::arg("w"), pybind11::arg("m"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
