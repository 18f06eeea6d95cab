// Python entry points of the CPU backend: the Program (a network, a block or any run of
// layers as one call), the Winograd weight transform, and what the build runs.
#include <torch/extension.h>

#include <algorithm>
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

// What a cached program assumed of its modules, tested in one pass per call: each
// module's class, its attributes (the __dict__ entries, by identity), its parameters and
// buffers (identity, version, requires_grad), its submodules and its forward hooks. In
// C++ because the forward before the test evicted every cache level, and Python waits
// on each cold object in turn (GoogLeNet: 0.3 ms for the plan's tests); here the lines
// each dict's test reads are prefetched a few dicts ahead, so the misses overlap.
class ModuleWatch {
 public:
  // What changed, a bitmask: tensors (the owner's fold caches tell whether a rebuild is
  // due), attributes or structure (a class, an attribute, a submodule: the program may
  // read any of them), hooks.
  enum Change : int { kTensors = 1, kAttributes = 2, kHooks = 4 };

  // `held` gets a reference to every object recorded; its owner keeps it as long as
  // the watch, so no address compared is freed and reused. A Python list, not references
  // kept here: the owner is in a module's __dict__, and the garbage collector must see
  // that cycle to free a model.
  ModuleWatch(const pybind11::sequence& modules, pybind11::list held) {
    const auto hold = [&](PyObject* object) { held.append(pybind11::handle(object)); };
    static const std::pair<PyObject*, Change> watched[] = {
        {PyUnicode_InternFromString("_parameters"), kTensors},
        {PyUnicode_InternFromString("_buffers"), kTensors},
        {PyUnicode_InternFromString("_modules"), kAttributes},
        {PyUnicode_InternFromString("_forward_hooks"), kHooks},
        {PyUnicode_InternFromString("_forward_pre_hooks"), kHooks}};
    for (const pybind11::handle m : modules) {
      const auto attrs = pybind11::reinterpret_steal<pybind11::object>(
          PyObject_GenericGetDict(m.ptr(), nullptr));
      if (!attrs) throw pybind11::error_already_set();
      hold(m.ptr());
      record(attrs.ptr(), kAttributes, m.ptr(), hold);
      for (const auto& [name, kind] : watched) {
        PyObject* d = PyDict_GetItemWithError(attrs.ptr(), name);  // borrowed
        if (!d && PyErr_Occurred()) throw pybind11::error_already_set();
        if (d && PyDict_Check(d)) record(d, kind, nullptr, hold);
      }
    }
  }

  int changes() const {
    int found = 0;
    size_t prefetched = 0;
    for (size_t i = 0; i < dicts_.size(); ++i) {
      const Dict& d = dicts_[i];
      for (const size_t end = dicts_[std::min(i + kAhead, dicts_.size() - 1)].lines_end;
           prefetched < end; ++prefetched)
        __builtin_prefetch(lines_[prefetched]);
      if (d.module) {
        const auto attrs = pybind11::reinterpret_steal<pybind11::object>(
            PyObject_GenericGetDict(d.module, nullptr));
        if (!attrs) throw pybind11::error_already_set();
        if (Py_TYPE(d.module) != d.type || attrs.ptr() != d.dict) found |= kAttributes;
      }
      if (found & d.kind) continue;
      if (PyDict_GET_SIZE(d.dict) != d.size) {
        found |= d.kind;
        continue;
      }
      PyObject *key, *value;
      Py_ssize_t pos = 0;
      for (const Entry* e = &entries_[d.first]; PyDict_Next(d.dict, &pos, &key, &value); ++e) {
        // Identity first: only a tensor's object is read (ints, tuples, strings are
        // immutable, and reading each would be a miss).
        if (key != e->key || value != e->value || (e->state && state(value) != e->state)) {
          found |= d.kind;
          break;
        }
      }
    }
    return found;
  }

 private:
  // How many dicts ahead of its test a dict's lines are prefetched.
  static constexpr size_t kAhead = 64;

  struct Dict {
    PyObject* dict;
    Py_ssize_t size;
    size_t first;      // its entries: entries_[first, first + size)
    size_t lines_end;  // its lines and those of the dicts before: lines_[0, lines_end)
    Change kind;
    PyObject* module;  // whose __dict__ it is (its class and the dict itself tested), or null
    PyTypeObject* type;
  };
  struct Entry {
    PyObject *key, *value;
    int64_t state;
  };

  // A tensor's version and requires_grad flag as one number (inference tensors have no
  // version: -1); 0 for anything else, compared by identity alone.
  static int64_t state(PyObject* value) {
    if (!THPVariable_Check(value)) return 0;
    const at::Tensor& t = THPVariable_Unpack(value);
    const int64_t version = t.is_inference() ? -1 : static_cast<int64_t>(t._version());
    return 2 * version + 4 + t.requires_grad();
  }

  template <typename Hold>
  void record(PyObject* dict, Change kind, PyObject* module, const Hold& hold) {
    hold(dict);
    // The module, the dict, the first lines of its keys (a combined dict's entries) and
    // its values (a split dict's: a module's __dict__).
    const auto* d = reinterpret_cast<PyDictObject*>(dict);
    const Py_ssize_t size = PyDict_GET_SIZE(dict);
    if (module) lines_.push_back(module);
    lines_.push_back(dict);
    for (int64_t offset = 0; offset < 64 + size * 24; offset += 64)
      lines_.push_back(reinterpret_cast<const char*>(d->ma_keys) + offset);
    for (int64_t offset = 0; d->ma_values && offset < size * 8; offset += 64)
      lines_.push_back(reinterpret_cast<const char*>(d->ma_values) + offset);
    const size_t first = entries_.size();
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(dict, &pos, &key, &value)) {
      entries_.push_back({key, value, state(value)});
      hold(key);
      hold(value);
      if (THPVariable_Check(value)) tensor_lines(value);
    }
    dicts_.push_back({dict, size, first, lines_.size(), kind, module,
                      module ? Py_TYPE(module) : nullptr});
  }

  // What state() reads: the Python object, the TensorImpl, its version counter (a
  // VariableVersion is one pointer to it) and its autograd meta (requires_grad).
  void tensor_lines(PyObject* value) {
    static_assert(sizeof(c10::VariableVersion) == sizeof(void*));
    const c10::TensorImpl* impl = THPVariable_Unpack(value).unsafeGetTensorImpl();
    lines_.push_back(value);
    for (size_t offset = 0; offset < sizeof(c10::TensorImpl); offset += 64)
      lines_.push_back(reinterpret_cast<const char*>(impl) + offset);
    lines_.push_back(*reinterpret_cast<void* const*>(&impl->version_counter()));
    lines_.push_back(impl->autograd_meta());
  }

  std::vector<const void*> lines_;  // what the tests read, dict by dict
  std::vector<Dict> dicts_;
  std::vector<Entry> entries_;
};

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
  using inception_cpu::ModuleWatch;
  pybind11::class_<ModuleWatch> watch(
      m, "ModuleWatch", pybind11::module_local(),
      "Some modules' classes, attributes, tensors (identity, version, requires_grad), "
      "submodules and forward hooks as they are when made");
  watch
      .def(pybind11::init<const pybind11::sequence&, pybind11::list>(),
           pybind11::arg("modules"), pybind11::arg("held"))
      .def("changes", &ModuleWatch::changes,
           "What changed since: a bitmask of TENSORS, ATTRIBUTES and HOOKS (0: nothing)");
  watch.attr("TENSORS") = int(ModuleWatch::kTensors);
  watch.attr("ATTRIBUTES") = int(ModuleWatch::kAttributes);
  watch.attr("HOOKS") = int(ModuleWatch::kHooks);
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
