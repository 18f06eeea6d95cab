// Python entry points of the CPU backend: the Program (a network, a block or any run of
// layers as one call), the Winograd weight transform, and what the build runs.
#include <torch/extension.h>

#include <chrono>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "inception_cpu.h"
#include "program.h"

namespace inception_cpu {

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

// A cached plan's per-call check, in C++ because the forward before it evicted every
// cache level: Python waits for each cold object in turn (0.2 ms to read GoogLeNet's 344
// tensors' versions, 0.17 ms for its 224 modules' hook dicts), a loop here overlaps the
// misses. Both read the dicts afresh (torch.func.functional_call writes into them).

// A tensor's version counter; -1 for inference tensors (they have none) and non-tensors.
int64_t version_of(PyObject* value) {
  if (!THPVariable_Check(value)) return -1;
  const at::Tensor& t = THPVariable_Unpack(value);
  return t.is_inference() ? -1 : static_cast<int64_t>(t._version());
}

// The tensors in some modules' _parameters / _buffers dicts (None entries skipped, as
// fold_cache.dict_tensors lists them) and their versions when made: `unchanged` is
// whether the dicts still hold the same objects at the same versions.
class TensorWatch {
 public:
  explicit TensorWatch(const pybind11::sequence& dicts) {
    for_each_tensor(dicts, [&](PyObject* value) {
      tensors_.push_back(pybind11::reinterpret_borrow<pybind11::object>(value));
      versions_.push_back(version_of(value));
      return true;
    });
  }

  bool unchanged(const pybind11::sequence& dicts) const {
    size_t i = 0;
    const bool same = for_each_tensor(dicts, [&](PyObject* value) {
      const bool match = i < tensors_.size() && tensors_[i].ptr() == value &&
                         versions_[i] == version_of(value);
      ++i;
      return match;
    });
    return same && i == tensors_.size();
  }

 private:
  // fn(value) for each non-None value, in order, while it returns true.
  template <typename F>
  static bool for_each_tensor(const pybind11::sequence& dicts, const F& fn) {
    for (const pybind11::handle d : dicts) {
      TORCH_CHECK(PyDict_Check(d.ptr()), "TensorWatch: expected dicts of tensors");
      PyObject *key, *value;
      Py_ssize_t pos = 0;
      while (PyDict_Next(d.ptr(), &pos, &key, &value))
        if (value != Py_None && !fn(value)) return false;
    }
    return true;
  }

  std::vector<pybind11::object> tensors_;  // held: their ids stay unique
  std::vector<int64_t> versions_;
};

// Whether any of `modules` has a forward or forward-pre hook of its own.
bool any_forward_hooks(const pybind11::sequence& modules) {
  static PyObject* const names[] = {PyUnicode_InternFromString("_forward_hooks"),
                                    PyUnicode_InternFromString("_forward_pre_hooks")};
  for (const pybind11::handle m : modules) {
    const auto attrs = pybind11::reinterpret_steal<pybind11::object>(
        PyObject_GenericGetDict(m.ptr(), nullptr));
    if (!attrs) throw pybind11::error_already_set();
    for (PyObject* name : names) {
      PyObject* hooks = PyDict_GetItemWithError(attrs.ptr(), name);  // borrowed
      if (!hooks && PyErr_Occurred()) throw pybind11::error_already_set();
      if (hooks && PyObject_IsTrue(hooks)) return true;
    }
  }
  return false;
}

}  // namespace inception_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "inception_fused CPU backend: the fused eval forward in C++ and OpenMP";
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
  pybind11::class_<inception_cpu::TensorWatch>(
      m, "TensorWatch", pybind11::module_local(),
      "The tensors some modules' _parameters / _buffers dicts hold, and their versions")
      .def(pybind11::init<const pybind11::sequence&>(), pybind11::arg("dicts"))
      .def("unchanged", &inception_cpu::TensorWatch::unchanged,
           "Whether `dicts` hold the same tensor objects at the same versions",
           pybind11::arg("dicts"));
  m.def("any_forward_hooks", &inception_cpu::any_forward_hooks,
        "Whether any of the modules has a forward or forward-pre hook of its own",
        pybind11::arg("modules"));
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
