// hybrit.Dispatcher (every op, choose, metrics), info, dispatch_report, the op table's dims.
#include "python/common.hpp"

namespace hybrit::python {

void bind_dispatch(py::module_& m) {
  m.def("info", [] { return json_to_python(hardware_json(hardware())); }, "The hardware probe as a dict (CPU, ISA, granted cores, caches, memory, GPUs).");

  py::class_<PyDispatcher>(m, "Dispatcher", R"doc(
Routes each op to the c, tbb or cuda backend by size, data location and the cost profile.

backend: force one backend for every op ("c", "tbb", "cuda"; None or "auto" decides per call).
ops: per-op forcing, e.g. {"matmul": "tbb"}.   simd: "scalar", "avx2" or "avx512" for the CPU kernels.
threads: tbb threads (0: the CPUs granted).    profile: a profile saved by dispatch-report.
config: a YAML file whose `dispatch:` section applies.  use_environment: read HYBRIT_BACKEND etc.
Arguments win over the environment, which wins over the config file.)doc")
      .def(py::init<std::optional<std::string>, std::optional<std::map<std::string, std::string>>, std::optional<std::string>, int,
                    std::optional<std::string>, std::optional<std::string>, bool>(),
           py::arg("backend") = py::none(), py::arg("ops") = py::none(), py::arg("simd") = py::none(), py::arg("threads") = 0,
           py::arg("profile") = py::none(), py::arg("config") = py::none(), py::arg("use_environment") = true)
      .def("quantize_ternary", &PyDispatcher::quantize_ternary, py::arg("w"), py::arg("out") = py::none(),
           "float32 weights -> (int8 array in {-1, 0, 1}, scale s): s = max(mean|w|, 1e-5), q = clip(round_half_even(w / s), -1, 1).\n"
           "out: an int8 array of w's shape to write q into (reusing it saves the page faults of new memory).")
      .def("quantize_int8_rows", &PyDispatcher::quantize_int8_rows, py::arg("x"), py::arg("out") = py::none(),
           "float32 (..., cols) -> (int8 array, float32 scales per row): s = 127 / max(max|x|, 1e-5), q = clip(round_half_even(x * s), -128, 127).\n"
           "out: an int8 array of x's shape to write q into.")
      .def("pack_ternary", &PyDispatcher::pack_ternary, py::arg("q"), py::arg("out") = py::none(),
           "int8 in {-1, 0, 1}, 1-D or 2-D -> uint8, 4 weights per byte (code q + 1) per row.")
      .def("unpack_ternary", &PyDispatcher::unpack_ternary, py::arg("packed"), py::arg("cols"), py::arg("out") = py::none(),
           "uint8 packed rows -> int8 weights, cols per row.")
      .def("matmul", &PyDispatcher::matmul, py::arg("a"), py::arg("b"), py::arg("trans_a") = false, py::arg("trans_b") = false,
           py::arg("alpha") = 1.0f, py::arg("beta") = 0.0f, py::arg("out") = py::none(),
           "alpha * op(a) @ op(b) + beta * out, float32. With out given, the result is written there (in place).")
      .def("matmul_ternary", &PyDispatcher::matmul_ternary, py::arg("xq"), py::arg("x_scales"), py::arg("w_packed"), py::arg("w_scale"),
           py::arg("out") = py::none(),
           "int8 activations (m, k) with float32 row scales (x ~ xq / scale), uint8 packed ternary weights (n, ceil(k / 4)) "
           "with their scale -> float32 (m, n) = (xq @ q_w.T) * w_scale / x_scales[:, None], dot products exact in integers.")
      .def("kmeans_assign", &PyDispatcher::kmeans_assign, py::arg("x"), py::arg("centroids"),
           "(n, d), (k, d) float32 -> (int32 labels, float32 squared distances); ties go to the lowest index.")
      .def("kmeans_update", &PyDispatcher::kmeans_update, py::arg("x"), py::arg("labels"), py::arg("k"),
           "(n, d) float32, int32 labels, k -> (float64 sums (k, d), int64 counts (k,)).")
      .def("choose", &PyDispatcher::choose, py::arg("op"), py::arg("dims"), py::arg("device") = "cpu",
           "The decision for an op of the given dims (see hybrit.op_size), without running it: backend, reason, predicted seconds.")
      .def("metrics", &PyDispatcher::metrics, "Per op and backend: calls, elements, bytes, seconds.")
      .def("reset_metrics", &PyDispatcher::reset_metrics)
      .def_property_readonly("backends", &PyDispatcher::backends, "Each backend's description, or None when it is unavailable.")
      .def("__repr__", &PyDispatcher::repr);

  m.def(
      "dispatch_report",
      [](bool quick, std::optional<std::vector<std::string>> ops, std::optional<std::string> backend, std::optional<std::string> save) {
        DispatcherOptions o;
        o.overrides = overrides_from(backend, std::nullopt, std::nullopt, 0, std::nullopt);
        ReportOptions ro;
        ro.quick = quick;
        ro.progress = false;
        if (ops)
          for (const auto& name : *ops) ro.ops.push_back(parse_op(name, "ops"));
        nlohmann::json r;
        {
          py::gil_scoped_release release;
          Dispatcher d(o);
          r = run_dispatch_report(d, ro);
          if (save) save_profile_from_report(r, d, *save);
        }
        return json_to_python(r);
      },
      py::arg("quick") = true, py::arg("ops") = py::none(), py::arg("backend") = py::none(), py::arg("save") = py::none(),
      "Time every op on every backend (see `hybrit dispatch-report`) and return the report as a dict; save= writes the profile.");

  m.def("_op_dims", [] {  // op -> (dims, their names), from the op table: Python's op_size reads it
    py::dict d;
    for (int i = 0; i < kOpCount; ++i) d[py::str(to_string(Op(i)))] = py::make_tuple(op_size_dims(Op(i)), op_size_dim_names(Op(i)));
    return d;
  });

  m.def("default_profile_path", &default_profile_path);
}

}  // namespace hybrit::python
