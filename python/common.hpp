// What every binding file of the _hybrit extension shares: numpy <-> Tensor views (zero-copy for
// C-contiguous inputs of the right dtype), the dispatcher a call runs on (hybrit.Dispatcher or a
// fresh one), config dicts read by the YAML schema, JSON to Python.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <filesystem>
#include <map>
#include <optional>

#include "clustering/kmeans.hpp"
#include "clustering/reduce.hpp"
#include "dispatch/dispatcher.hpp"
#include "dispatch/report.hpp"
#include "inference/engine.hpp"
#include "inference/gguf.hpp"
#include "training/evaluate.hpp"
#include "model/model.hpp"
#include "training/trainer.hpp"

namespace hybrit::python {

namespace py = pybind11;

inline py::object json_to_python(const nlohmann::json& j) { return py::module_::import("json").attr("loads")(j.dump()); }

inline std::string dtype_str(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

// A numpy array checked for dtype, layout and rank, seen as a Tensor without copying. The array
// must outlive the tensor; every caller below keeps it alive for the whole call.
template <class T>
Tensor view(const py::handle& obj, const char* name, int min_ndim, int max_ndim, const char* numpy_type) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(cat(name, " must be a numpy array, got ", py::str(py::type::of(obj).attr("__name__")).cast<std::string>()));
  py::array a = py::reinterpret_borrow<py::array>(obj);
  if (!a.dtype().is(py::dtype::of<T>()))
    throw py::type_error(cat(name, " must be a ", numpy_type, " array, got ", dtype_str(a), " (convert with ", name, ".astype(np.", numpy_type, "))"));
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(cat(name, " must be C-contiguous (pass np.ascontiguousarray(", name, "))"));
  if (a.ndim() < min_ndim || a.ndim() > max_ndim)
    throw py::value_error(min_ndim == max_ndim ? cat(name, " must have ", min_ndim, " dimensions, got ", a.ndim())
                                               : cat(name, " must have ", min_ndim, " to ", max_ndim, " dimensions, got ", a.ndim()));
  Shape shape(a.shape(), a.shape() + a.ndim());
  return Tensor::wrap(const_cast<void*>(a.data()), shape, dtype_of<T>(), nullptr);
}

template <class T>
std::pair<py::array_t<T>, Tensor> new_array(const Shape& shape) {
  std::vector<py::ssize_t> dims(shape.begin(), shape.end());
  py::array_t<T> a(dims);
  Tensor t = Tensor::wrap(a.mutable_data(), shape, dtype_of<T>(), nullptr);
  return {a, t};
}

// A new numpy array holding a copy of a host tensor.
template <class T>
py::array_t<T> copy_to_numpy(const Tensor& t) {
  auto [a, view] = new_array<T>(t.shape());
  std::memcpy(view.raw(), t.raw(), t.nbytes());
  return a;
}

// The output array: `out` when given (checked: dtype, layout, shape, writeable), else a new one.
// Reusing an output saves the page faults of fresh memory, which cost more than the kernel.
template <class T>
std::pair<py::array, Tensor> output_array(const py::object& out, const Shape& shape, const char* numpy_type) {
  if (out.is_none()) return new_array<T>(shape);
  Tensor t = view<T>(out, "out", 0, 32, numpy_type);
  if (t.shape() != shape) throw py::value_error(cat("out must have shape ", shape_str(shape), ", got ", shape_str(t.shape())));
  if (!py::reinterpret_borrow<py::array>(out).writeable()) throw py::value_error("out must be writeable");
  return {py::reinterpret_borrow<py::array>(out), t};
}

// Dispatcher metrics as {op: {backend: {calls, elements, bytes, seconds}}}, ops that ran only.
inline py::dict metrics_dict(const Metrics& metrics) { return json_to_python(metrics_json(metrics)); }

inline Overrides overrides_from(const std::optional<std::string>& backend, const std::optional<std::map<std::string, std::string>>& ops,
                         const std::optional<std::string>& simd, int threads, const std::optional<std::string>& profile) {
  Overrides o;  // through Overrides::set, the parser every source uses
  o.source = "argument";
  if (backend) o.set("backend", *backend, "backend");
  if (ops)
    for (const auto& [op, kind] : *ops) o.set("ops." + op, kind, cat("ops[", op, "]"));
  if (simd) o.set("simd", *simd, "simd");
  if (threads != 0) o.set("threads", cat(threads), "threads");
  if (profile) o.set("profile", *profile, "profile");
  return o;
}

class PyDispatcher {
 public:
  PyDispatcher(std::optional<std::string> backend, std::optional<std::map<std::string, std::string>> ops, std::optional<std::string> simd,
               int threads, std::optional<std::string> profile, std::optional<std::string> config, bool use_environment) {
    DispatcherOptions o;
    o.overrides = overrides_from(backend, ops, simd, threads, profile);
    o.config_path = config.value_or("");
    o.use_environment = use_environment;
    d_ = std::make_unique<Dispatcher>(o);
  }

  py::tuple quantize_ternary(const py::object& w_obj, const py::object& out) {
    Tensor w = view<float>(w_obj, "w", 0, 32, "float32");
    auto [q, qt] = output_array<int8_t>(out, w.shape(), "int8");
    float s;
    {
      py::gil_scoped_release release;
      s = d_->quantize_ternary(w, qt);
    }
    return py::make_tuple(q, s);
  }

  py::tuple quantize_int8_rows(const py::object& x_obj, const py::object& out) {
    Tensor x = view<float>(x_obj, "x", 1, 32, "float32");
    auto [q, qt] = output_array<int8_t>(out, x.shape(), "int8");
    auto [s, st] = new_array<float>({as_matrix(x).first});
    {
      py::gil_scoped_release release;
      d_->quantize_int8_rows(x, qt, st);
    }
    return py::make_tuple(q, s);
  }

  py::array pack_ternary(const py::object& q_obj, const py::object& out) {
    Tensor q = view<int8_t>(q_obj, "q", 1, 2, "int8");
    const auto [rows, cols] = as_matrix(q);
    Shape out_shape = q.ndim() == 1 ? Shape{(cols + 3) / 4} : Shape{rows, (cols + 3) / 4};
    auto [p, pt] = output_array<uint8_t>(out, out_shape, "uint8");
    {
      py::gil_scoped_release release;
      d_->pack_ternary(q, pt);
    }
    return p;
  }

  py::array unpack_ternary(const py::object& p_obj, int64_t cols, const py::object& out) {
    Tensor p = view<uint8_t>(p_obj, "packed", 1, 2, "uint8");
    if (cols < 0) throw py::value_error(cat("cols must be >= 0, got ", cols));
    const int64_t rows = p.ndim() == 1 ? 1 : p.dim(0);
    if (p.shape().back() != (cols + 3) / 4)
      throw py::value_error(cat("packed rows hold ", p.shape().back(), " bytes, but ", cols, " columns need ", (cols + 3) / 4));
    auto [q, qt] = output_array<int8_t>(out, p.ndim() == 1 ? Shape{cols} : Shape{rows, cols}, "int8");
    {
      py::gil_scoped_release release;
      d_->unpack_ternary(p, qt);
    }
    return q;
  }

  py::array matmul(const py::object& a_obj, const py::object& b_obj, bool trans_a, bool trans_b, float alpha, float beta, const py::object& out) {
    Tensor a = view<float>(a_obj, "a", 2, 2, "float32"), b = view<float>(b_obj, "b", 2, 2, "float32");
    const int64_t m = trans_a ? a.dim(1) : a.dim(0), n = trans_b ? b.dim(0) : b.dim(1);
    py::array result;
    Tensor c;
    if (out.is_none()) {
      if (beta != 0.0f) throw py::value_error("beta != 0 reads the output: pass out=");
      auto [arr, t] = new_array<float>({m, n});
      result = arr;
      c = t;
    } else {
      c = view<float>(out, "out", 2, 2, "float32");
      if (!py::reinterpret_borrow<py::array>(out).writeable()) throw py::value_error("out must be writeable");
      result = py::reinterpret_borrow<py::array>(out);
    }
    {
      py::gil_scoped_release release;
      d_->matmul(a, b, c, {trans_a, trans_b, alpha, beta});
    }
    return result;
  }

  py::array matmul_ternary(const py::object& x_obj, const py::object& s_obj, const py::object& w_obj, float w_scale, const py::object& out) {
    Tensor xq = view<int8_t>(x_obj, "xq", 2, 2, "int8"), scales = view<float>(s_obj, "x_scales", 1, 1, "float32");
    Tensor w = view<uint8_t>(w_obj, "w_packed", 2, 2, "uint8");
    // The kernels trust their inputs (the engine packs its own weights); numpy arrays are checked here.
    const float* sp = scales.data<float>();
    for (int64_t r = 0; r < scales.numel(); ++r)
      if (!(std::isfinite(sp[r]) && sp[r] > 0))
        throw py::value_error(cat("x_scales: row ", r, " has scale ", sp[r], "; expected a positive finite number (127 / absmax)"));
    const int64_t k = xq.dim(1), packed_cols = w.dim(1);
    const uint8_t* wp = w.data<uint8_t>();
    for (int64_t r = 0; r < w.dim(0); ++r)
      for (int64_t c = 0; c < std::min(k, packed_cols * 4); ++c)
        if (((wp[r * packed_cols + c / 4] >> (2 * (c % 4))) & 3) == 3)
          throw py::value_error(cat("w_packed: row ", r, ", column ", c, " holds the code 0b11; codes are weight + 1 in {0, 1, 2}"));
    auto [result, y] = output_array<float>(out, {xq.dim(0), w.dim(0)}, "float32");
    {
      py::gil_scoped_release release;
      d_->matmul_ternary(xq, scales, w, w_scale, y);
    }
    return result;
  }

  py::tuple kmeans_assign(const py::object& x_obj, const py::object& c_obj) {
    Tensor x = view<float>(x_obj, "x", 2, 2, "float32"), cen = view<float>(c_obj, "centroids", 2, 2, "float32");
    auto [labels, lt] = new_array<int32_t>({x.dim(0)});
    auto [dist, dt] = new_array<float>({x.dim(0)});
    {
      py::gil_scoped_release release;
      d_->kmeans_assign(x, cen, lt, dt);
    }
    return py::make_tuple(labels, dist);
  }

  py::tuple kmeans_update(const py::object& x_obj, const py::object& l_obj, int64_t k) {
    Tensor x = view<float>(x_obj, "x", 2, 2, "float32"), labels = view<int32_t>(l_obj, "labels", 1, 1, "int32");
    if (k < 0) throw py::value_error(cat("k must be >= 0, got ", k));
    auto [sums, st] = new_array<double>({k, x.dim(1)});
    auto [counts, ct] = new_array<int64_t>({k});
    {
      py::gil_scoped_release release;
      d_->kmeans_update(x, labels, st, ct);
    }
    return py::make_tuple(sums, counts);
  }

  py::dict choose(const std::string& op, const std::vector<int64_t>& dims, const std::string& device) const {
    if (dims.empty() || dims.size() > 3) throw py::value_error("dims: give 1 to 3 sizes (see hybrit.op_size)");
    const OpSize size = op_size(parse_op(op, "op"), dims[0], dims.size() > 1 ? dims[1] : 1, dims.size() > 2 ? dims[2] : 1);
    if (device != "cpu" && device != "cuda") throw py::value_error(cat("device must be 'cpu' or 'cuda', got '", device, "'"));
    const Device dev = device == "cpu" ? Device::cpu() : Device::cuda(0);
    const Decision d = d_->choose(size, dev);
    py::dict predicted;
    for (int b = 0; b < kBackendCount; ++b)
      if (std::isfinite(d.predicted_seconds[b])) predicted[to_string(BackendKind(b))] = d.predicted_seconds[b];
    py::dict out;
    out["backend"] = to_string(d.backend);
    out["reason"] = d.reason;
    out["predicted_seconds"] = predicted;
    return out;
  }

  py::dict metrics() const { return metrics_dict(d_->metrics()); }

  void reset_metrics() { d_->metrics().reset(); }

  py::dict backends() const {
    py::dict out;
    for (int b = 0; b < kBackendCount; ++b)
      out[to_string(BackendKind(b))] = d_->available(BackendKind(b)) ? py::str(d_->backend(BackendKind(b)).describe()) : py::object(py::none());
    return out;
  }

  std::string repr() const {
    std::string s = "<hybrit.Dispatcher";
    for (int b = 0; b < kBackendCount; ++b)
      s += cat(" ", to_string(BackendKind(b)), "=", d_->available(BackendKind(b)) ? "'" + d_->backend(BackendKind(b)).describe() + "'" : std::string("unavailable"));
    return s + cat(" profile='", d_->policy().profile.source, "'>");
  }

  Dispatcher& get() { return *d_; }

 private:
  std::unique_ptr<Dispatcher> d_;
};

// A config dict as JSON text, which the YAML config parsers read as they read a file (types kept:
// "big" stays a string, so errors name the key and the value). numpy scalars become numbers.
inline std::string config_json(const py::dict& config) {
  const py::cpp_function plain([](const py::object& o) -> py::object {
    if (py::hasattr(o, "item")) return o.attr("item")();
    throw py::type_error(cat("config: a ", std::string(py::str(o.get_type().attr("__name__"))), " cannot be a config value"));
  });
  return py::module_::import("json").attr("dumps")(config, py::arg("default") = plain).cast<std::string>();
}

// The dispatcher a module function runs on: the caller's `dispatcher=` (reused: no new TBB arena,
// CUDA context or profile read per call), or a fresh one with `backend=` forced. Both at once is
// an error: which one wins would be a guess.
class CallDispatcher {
 public:
  CallDispatcher(const py::object& given, const std::optional<std::string>& backend) {
    if (!given.is_none()) {
      if (backend) throw py::value_error("give dispatcher= or backend=, not both (force the backend when making the Dispatcher)");
      if (!py::isinstance<PyDispatcher>(given))
        throw py::type_error(cat("dispatcher: expected a hybrit.Dispatcher, got ", std::string(py::str(given.get_type().attr("__name__")))));
      d_ = &given.cast<PyDispatcher&>().get();
    } else {
      options_.overrides = overrides_from(backend, std::nullopt, std::nullopt, 0, std::nullopt);
    }
  }
  Dispatcher& get() {  // made on first use, so it can be made with the GIL released
    if (!d_) owned_ = std::make_unique<Dispatcher>(options_), d_ = owned_.get();
    return *d_;
  }

 private:
  DispatcherOptions options_;
  std::unique_ptr<Dispatcher> owned_;
  Dispatcher* d_ = nullptr;
};

// One binding file per capability registers its part of the module.
void bind_dispatch(py::module_& m);
void bind_training(py::module_& m);
void bind_clustering(py::module_& m);
void bind_inference(py::module_& m);

}  // namespace hybrit::python
