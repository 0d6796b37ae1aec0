// The _hybrit extension: numpy arrays in and out, zero-copy for C-contiguous inputs of the right
// dtype, the GIL released while kernels run. Errors become ValueError / OSError / RuntimeError /
// MemoryError by kind. The `hybrit` package (hybrit/__init__.py) re-exports all of it.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>

#include "dispatch/dispatcher.hpp"
#include "dispatch/report.hpp"
#include "clustering/kmeans.hpp"
#include "clustering/reduce.hpp"
#include "inference/engine.hpp"
#include "training/model.hpp"
#include "training/evaluate.hpp"
#include "training/trainer.hpp"

#include <filesystem>
#include <map>

namespace py = pybind11;
using namespace hybrit;

namespace {

py::object json_to_python(const nlohmann::json& j) { return py::module_::import("json").attr("loads")(j.dump()); }

std::string dtype_str(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

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
py::dict metrics_dict(const Metrics& metrics) { return json_to_python(metrics_json(metrics)); }

Overrides overrides_from(const std::optional<std::string>& backend, const std::optional<std::map<std::string, std::string>>& ops,
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
std::string config_json(const py::dict& config) {
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

ModelConfig model_config_from(const py::dict& d) { return parse_model_config(YAML::Load(config_json(d)), "Model(config)"); }

// What model_config_from reads back: every key of a `model:` section, resolved.
py::dict model_config_dict(const ModelConfig& c) {
  py::dict d;
  d["vocab_size"] = c.vocab_size, d["dim"] = c.dim, d["n_layers"] = c.n_layers, d["n_heads"] = c.n_heads, d["n_kv_heads"] = c.kv_heads();
  d["ffn_hidden"] = c.hidden(), d["context"] = c.context, d["rope_theta"] = c.rope_theta, d["norm_eps"] = c.norm_eps;
  d["ffn"] = c.ffn == ModelConfig::Ffn::swiglu ? "swiglu" : "relu2", d["quant"] = c.quant == ModelConfig::Quant::ternary ? "ternary" : "none";
  d["subln"] = c.subln, d["tied_embeddings"] = c.tied_embeddings;
  return d;
}

// A model with its own dispatcher; parameters and gradients are numpy views into its buffers.
py::dict table_views(const py::object& owner, ParamTable& t, bool grads);

// The engine behind hybrit.Generator (python/hybrit/__init__.py builds generate() and stream()
// on submit/step). Events are queued here and handed out by step().
class PyGenerator {
 public:
  PyGenerator(const std::string& checkpoint, bool packed, int64_t kv_blocks, int64_t max_running, int64_t prefill_chunk,
              std::optional<std::string> backend) {
    DispatcherOptions o;
    o.overrides = overrides_from(backend, std::nullopt, std::nullopt, 0, std::nullopt);
    py::gil_scoped_release release;
    dispatcher_ = std::make_unique<Dispatcher>(o);
    model_ = std::make_unique<InferenceModel>(*dispatcher_, checkpoint, packed);
    EngineOptions eo;
    eo.kv_blocks = kv_blocks, eo.max_running = max_running, eo.prefill_chunk = prefill_chunk;
    engine_ = std::make_unique<Engine>(*model_, eo);
  }
  std::vector<int32_t> encode(const std::string& text) const {
    std::vector<int32_t> ids;
    model_->tokenizer().encode(text, ids);
    return ids;
  }
  py::bytes decode(const std::vector<int32_t>& ids) const {
    const int64_t vocab = model_->tokenizer().vocab_size();
    for (size_t i = 0; i < ids.size(); ++i)
      if (ids[i] < 0 || ids[i] >= vocab) throw py::value_error(cat("decode: token ", ids[i], " at position ", i, " is outside [0, ", vocab, ")"));
    return py::bytes(model_->tokenizer().decode(ids.data(), ids.size()));
  }
  int64_t submit(const std::vector<int32_t>& prompt, int64_t max_tokens, double temperature, int64_t top_k, double top_p, double min_p,
                 double repetition_penalty, uint64_t seed, const std::vector<std::string>& stop) {  // __init__.py draws an absent seed
    GenerationRequest r;
    r.prompt = prompt, r.max_tokens = max_tokens, r.stop = stop;
    r.sampling = {temperature, top_k, top_p, min_p, repetition_penalty, seed};
    r.on_event = [this](const GenerationEvent& e) { events_.push_back(e); };
    return engine_->submit(std::move(r));
  }
  py::list step() {
    {
      py::gil_scoped_release release;
      engine_->step();
    }
    py::list out;
    for (const auto& e : events_)
      out.append(py::make_tuple(e.request, e.token, py::bytes(e.text), e.finished == FinishReason::none ? py::object(py::none()) : py::str(to_string(e.finished))));
    events_.clear();
    return out;
  }
  void cancel(int64_t id) { engine_->cancel(id); }
  bool idle() const { return engine_->idle(); }
  py::array_t<float> last_logits(const std::vector<int32_t>& tokens) {
    std::vector<float> logits;
    {
      py::gil_scoped_release release;
      logits = model_->last_logits(tokens);
    }
    return py::array_t<float>(py::ssize_t(logits.size()), logits.data());
  }
  py::dict stats() const {
    const EngineStats s = engine_->stats();
    py::dict d;
    d["running"] = s.running, d["waiting"] = s.waiting, d["finished"] = s.finished, d["preemptions"] = s.preemptions, d["steps"] = s.steps;
    d["window_slides"] = s.window_slides;
    d["tokens_generated"] = s.tokens_generated, d["prompt_tokens_computed"] = s.prompt_tokens_computed;
    d["prompt_tokens_cached"] = s.prompt_tokens_cached, d["wasted_slots"] = s.wasted_slots;
    d["kv_blocks"] = s.kv.blocks, d["kv_in_use"] = s.kv.in_use, d["kv_cached"] = s.kv.cached, d["kv_free"] = s.kv.free;
    d["prefix_lookups"] = s.kv.prefix_lookups, d["prefix_hits"] = s.kv.prefix_hits;
    return d;
  }
  py::dict info() const {
    py::dict d;
    const ModelConfig& c = model_->config();
    d["context"] = c.context, d["vocab_size"] = c.vocab_size, d["dim"] = c.dim, d["n_layers"] = c.n_layers;
    d["packed"] = model_->packed(), d["weight_bytes"] = model_->weight_bytes(), d["kv_bytes_per_token"] = model_->kv_bytes_per_token();
    d["end_of_record"] = model_->tokenizer().end_of_record();
    return d;
  }

 private:
  std::unique_ptr<Dispatcher> dispatcher_;
  std::unique_ptr<InferenceModel> model_;
  std::unique_ptr<Engine> engine_;
  std::vector<GenerationEvent> events_;
};

class PyModel {
 public:
  PyModel(const py::dict& config, uint64_t seed, std::optional<std::string> backend)
      : dispatcher_(options_for(backend)), model_(std::make_unique<Model>(model_config_from(config), dispatcher_, seed)) {}
  // A training checkpoint's model with its parameters loaded (checksums verified).
  PyModel(const std::string& checkpoint, std::optional<std::string> backend) : dispatcher_(options_for(backend)) {
    CheckpointModel cm = load_checkpoint_model(dispatcher_, checkpoint);
    model_ = std::move(cm.model);
    step_ = cm.meta.step;
  }

  static py::dict views(const py::object& self_obj, bool grads);

  double forward(const py::object& tokens_obj, const py::object& targets_obj) {
    Tensor tokens = view<int32_t>(tokens_obj, "tokens", 2, 2, "int32"), targets = view<int32_t>(targets_obj, "targets", 2, 2, "int32");
    if (tokens.shape() != targets.shape())
      throw py::value_error(cat("targets must have the shape of tokens ", shape_str(tokens.shape()), ", got ", shape_str(targets.shape())));
    py::gil_scoped_release release;
    return model_->forward(tokens.data<int32_t>(), targets.data<int32_t>(), tokens.dim(0), tokens.dim(1));
  }

  void backward() {
    py::gil_scoped_release release;
    model_->backward();
  }

  py::array logits() const {
    const Tensor& l = model_->logits();
    if (!l.numel()) throw py::value_error("logits() before forward()");
    py::array_t<float> out({l.dim(0), l.dim(1)});
    std::memcpy(out.mutable_data(), l.raw(), l.nbytes());
    return out;
  }

  Model& model() { return *model_; }
  int64_t step() const { return step_; }

 private:
  static DispatcherOptions options_for(const std::optional<std::string>& backend) {
    DispatcherOptions o;
    o.overrides = overrides_from(backend, std::nullopt, std::nullopt, 0, std::nullopt);
    return o;
  }
  Dispatcher dispatcher_;
  std::unique_ptr<Model> model_;
  int64_t step_ = 0;  // the checkpoint's training step (0 for a fresh model)
};

py::dict PyModel::views(const py::object& self_obj, bool grads) {
  return table_views(self_obj, self_obj.cast<PyModel&>().model().params(), grads);  // the model stays alive with the views
}

// A config given as a path or as a dict (as JSON, see config_json).
TrainConfig train_config_from(const py::object& config, const std::vector<std::string>& sets) {
  if (py::isinstance<py::str>(config) || py::hasattr(config, "__fspath__"))
    return load_train_config(py::str(config).cast<std::string>(), sets);
  if (py::isinstance<py::dict>(config))
    return parse_train_config(config_json(config.cast<py::dict>()), "<config dict>", sets);
  throw py::type_error("config must be a path to a YAML file or a dict");
}

py::dict step_dict(const StepMetrics& m) {
  py::dict d;
  d["step"] = m.step;
  d["loss"] = m.loss;
  d["lr"] = m.lr;
  d["grad_norm"] = m.grad_norm;
  d["tokens_per_s"] = m.tokens_per_s;
  d["peak_rss_bytes"] = m.peak_rss_bytes;
  d["skipped"] = m.skipped;
  if (m.val_loss) d["val_loss"] = *m.val_loss;
  return d;
}

py::dict table_views(const py::object& owner, ParamTable& t, bool grads) {
  py::dict out;
  for (const auto& s : t.slices()) {
    Tensor v = grads ? t.grad(s) : t.param(s);
    std::vector<py::ssize_t> shape(s.shape.begin(), s.shape.end());
    out[py::str(s.name)] = py::array_t<float>(shape, v.data<float>(), owner);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_hybrit, m) {
  m.doc() = "hybrit: 1.58-bit (ternary) transformer training and serving; this is the native core";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Error& e) {
      switch (e.kind()) {
        case ErrorKind::invalid_argument: PyErr_SetString(PyExc_ValueError, e.what()); return;
        case ErrorKind::io: PyErr_SetString(PyExc_OSError, e.what()); return;
        case ErrorKind::out_of_memory: PyErr_SetString(PyExc_MemoryError, e.what()); return;
        case ErrorKind::corrupt_data:
        case ErrorKind::unsupported:
        case ErrorKind::count: PyErr_SetString(PyExc_RuntimeError, e.what()); return;
      }
    }
  });

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
  // The defaults the Python signatures show, read from the C++ structs (one set for every front end).
  m.def("_sampling_defaults", [] {
    const SamplingParams p;
    py::dict d;
    d["temperature"] = p.temperature, d["top_k"] = p.top_k, d["top_p"] = p.top_p, d["min_p"] = p.min_p;
    d["repetition_penalty"] = p.repetition_penalty;
    return d;
  });
  m.def("_engine_defaults", [] {
    const EngineOptions e;
    py::dict d;
    d["kv_blocks"] = e.kv_blocks, d["max_running"] = e.max_running, d["prefill_chunk"] = e.prefill_chunk;
    return d;
  });

  py::class_<PyGenerator>(m, "_Generator")
      .def(py::init<const std::string&, bool, int64_t, int64_t, int64_t, std::optional<std::string>>(), py::arg("checkpoint"), py::arg("packed") = true,
           py::arg("kv_blocks") = EngineOptions{}.kv_blocks, py::arg("max_running") = EngineOptions{}.max_running,
           py::arg("prefill_chunk") = EngineOptions{}.prefill_chunk, py::arg("backend") = py::none())
      .def("encode", &PyGenerator::encode)
      .def("decode", &PyGenerator::decode)
      .def("submit", &PyGenerator::submit)
      .def("step", &PyGenerator::step)
      .def("cancel", &PyGenerator::cancel)
      .def("idle", &PyGenerator::idle)
      .def("last_logits", &PyGenerator::last_logits)
      .def("stats", &PyGenerator::stats)
      .def("info", &PyGenerator::info);

  py::class_<PyModel>(m, "Model", R"doc(
The BitNet b1.58 transformer with hand-written backward (training/model.hpp).

config: dict with any of vocab_size, dim, n_layers, n_heads, n_kv_heads, ffn_hidden, context,
rope_theta, norm_eps, ffn ("swiglu" | "relu2"), quant ("ternary" | "none"), subln, tied_embeddings.
parameters() and gradients() are numpy views into the model's buffers (writes go to the model).)doc")
      .def(py::init<const py::dict&, uint64_t, std::optional<std::string>>(), py::arg("config"), py::arg("seed") = 0,
           py::arg("backend") = py::none())
      .def_static("from_checkpoint", [](const std::string& path, std::optional<std::string> backend) {
             std::unique_ptr<PyModel> m;
             {
               py::gil_scoped_release release;
               m = std::make_unique<PyModel>(find_checkpoint(path), backend);
             }
             return m;
           }, py::arg("path"), py::arg("backend") = py::none(),
           "The model of a training checkpoint (a .h5 file, or a run folder: its newest valid checkpoint), parameters loaded and verified.")
      .def_property_readonly("step", &PyModel::step, "The checkpoint's training step (0 for a model built from a config).")
      .def_property_readonly("config", [](PyModel& self) { return model_config_dict(self.model().config()); }, "The model's configuration as a dict.")
      .def("parameters", [](const py::object& self) { return PyModel::views(self, false); })
      .def("gradients", [](const py::object& self) { return PyModel::views(self, true); })
      .def("zero_grads", [](PyModel& self) { self.model().params().zero_grads(); })
      .def("forward", &PyModel::forward, py::arg("tokens"), py::arg("targets"),
           "int32 (batch, seq) tokens and targets -> mean cross-entropy; keeps what backward() needs.")
      .def("backward", &PyModel::backward, "Adds the last forward's gradients to gradients().")
      .def("logits", &PyModel::logits, "(batch * seq, vocab) logits of the last forward, a copy.");

  py::class_<Trainer>(m, "Trainer", R"doc(
A training run driven from Python: the corpus, the model and the optimizers of a config (a YAML
path or a dict with the same sections), one step at a time. cache_dir: where the token cache goes.)doc")
      .def(py::init([](const py::object& config, const std::vector<std::string>& sets, const std::string& cache_dir) {
             TrainConfig cfg = train_config_from(config, sets);
             py::gil_scoped_release release;
             return std::make_unique<Trainer>(cfg, cache_dir);
           }),
           py::arg("config"), py::arg("sets") = std::vector<std::string>{}, py::arg("cache_dir") = "")
      .def("step", [](Trainer& t) {
             StepMetrics s;
             {
               py::gil_scoped_release release;
               s = t.step();
             }
             return step_dict(s);
           }, "One optimizer step; returns its metrics as a dict.")
      .def("evaluate", [](Trainer& t) {
             py::gil_scoped_release release;
             return t.evaluate();
           }, "Mean validation loss over train.eval_batches fixed batches.")
      .def("save", [](Trainer& t, const std::string& path) {
             py::gil_scoped_release release;
             t.save(path);
           }, py::arg("path"), "Writes a checkpoint (HDF5): parameters, optimizer state, step, config, tokenizer.")
      .def("restore", [](Trainer& t, const std::string& path) {
             py::gil_scoped_release release;
             t.restore(path);
           }, py::arg("path"), "Loads a checkpoint of the same architecture, data and seed; continues from its step.")
      .def("sample", [](Trainer& t, int64_t tokens, const std::string& prompt, double temperature, uint64_t seed) {
             std::string s;
             {
               py::gil_scoped_release release;
               s = printable_utf8(t.sample(tokens, prompt, temperature, seed));
             }
             return s;
           }, py::arg("tokens") = 200, py::arg("prompt") = "", py::arg("temperature") = 0.8, py::arg("seed") = 0)
      .def("batch", [](const Trainer& t, int64_t step) {
             const int64_t b = t.config().train.batch, c = t.config().model.context;
             py::array_t<int32_t> inputs({b, c}), targets({b, c});
             t.batch(step, inputs.mutable_data(), targets.mutable_data());
             return py::make_tuple(inputs, targets);
           }, py::arg("step"), "The (inputs, targets) int32 arrays, (batch, context) each, that step() trains on at `step`.")
      .def_property_readonly("steps_done", &Trainer::steps_done)
      .def("parameters", [](const py::object& self) { return table_views(self, self.cast<Trainer&>().model().params(), false); })
      .def("gradients", [](const py::object& self) { return table_views(self, self.cast<Trainer&>().model().params(), true); })
      .def("config_yaml", [](const Trainer& t) { return t.config().to_yaml(); }, "The resolved configuration as YAML.")
      .def("metrics", [](Trainer& t) { return metrics_dict(t.dispatcher().metrics()); },
           "The dispatcher's metrics for this run: {op: {backend: {calls, elements, bytes, seconds}}}.");

  m.def(
      "train",
      [](const py::object& config, std::optional<std::string> out, const std::vector<std::string>& sets) {
        TrainConfig cfg = train_config_from(config, sets);
        if (!out) out = default_run_folder(cfg.source == "<config dict>" ? "run" : std::filesystem::path(cfg.source).stem().string());
        RunResult r;
        {
          py::gil_scoped_release release;
          r = run_training(cfg, *out);
        }
        py::dict d;
        d["run_dir"] = *out;
        d["steps"] = r.steps_done;
        d["loss"] = r.last_loss;
        d["val_loss"] = r.val_loss ? py::object(py::float_(*r.val_loss)) : py::object(py::none());
        d["interrupted"] = r.interrupted;
        d["sample"] = r.sample;
        return d;
      },
      py::arg("config"), py::arg("out") = py::none(), py::arg("sets") = std::vector<std::string>{},
      "Runs `hybrit train` from Python: a config path or dict; returns the run folder, steps, losses and the sample.");

  m.def(
      "_load_checkpoint",
      [](const std::string& path) {
        CheckpointMeta meta;
        std::vector<NamedArray> arrays;
        {
          py::gil_scoped_release release;
          arrays = read_checkpoint_arrays(path, &meta);
        }
        py::dict params, optim;
        for (auto& a : arrays) {
          std::vector<py::ssize_t> shape(a.shape.begin(), a.shape.end());
          py::array_t<float> arr(shape);
          std::memcpy(arr.mutable_data(), a.values.data(), a.values.size() * sizeof(float));
          if (a.name.rfind("params/", 0) == 0) params[py::str(a.name.substr(7))] = arr;
          else optim[py::str(a.name.substr(6))] = arr;
        }
        py::dict out;
        out["step"] = meta.step;
        out["tokens_seen"] = meta.tokens_seen;
        out["seed"] = meta.seed;
        out["config_yaml"] = meta.config_yaml;
        out["tokenizer"] = meta.tokenizer_json;
        out["params"] = params;
        out["optimizer"] = optim;
        return out;
      },
      py::arg("path"));

  py::class_<KMeansResult>(m, "KMeansResult", "centroids (k, d) float32, labels (n,) int32, inertia, n_iter, converged")
      .def_property_readonly("centroids", [](const KMeansResult& r) { return copy_to_numpy<float>(r.centroids); })
      .def_property_readonly("labels", [](const KMeansResult& r) { return copy_to_numpy<int32_t>(r.labels); })
      .def_readonly("inertia", &KMeansResult::inertia)
      .def_readonly("n_iter", &KMeansResult::iterations)
      .def_readonly("converged", &KMeansResult::converged)
      .def("__repr__", [](const KMeansResult& r) {
        return cat("<hybrit.KMeansResult k=", r.centroids.dim(0), " inertia=", r.inertia, " n_iter=", r.iterations, " converged=", r.converged ? "True" : "False", ">");
      });

  m.def(
      "kmeans",
      [](const py::object& x_obj, int64_t k, uint64_t seed, int n_init, int max_iter, double tol, const py::object& init,
         int64_t max_points_per_centroid, bool spherical, std::optional<std::string> backend, const py::object& dispatcher) {
        CallDispatcher cd(dispatcher, backend);
        Tensor x = view<float>(x_obj, "x", 2, 2, "float32");
        KMeansOptions o;
        o.k = k, o.seed = seed, o.n_init = n_init, o.max_iter = max_iter, o.tol = tol;
        o.max_points_per_centroid = max_points_per_centroid, o.spherical = spherical;
        if (py::isinstance<py::str>(init)) {
          const std::string s = init.cast<std::string>();
          if (s == "k-means++") o.init = KMeansOptions::Init::kmeanspp;
          else if (s == "random") o.init = KMeansOptions::Init::random;
          else throw py::value_error(cat("init: expected 'k-means++', 'random' or a (k, d) float32 array, got '", s, "'"));
        } else {
          o.init = KMeansOptions::Init::given;
          o.initial_centroids = view<float>(init, "init", 2, 2, "float32").clone();
        }
        py::gil_scoped_release release;
        return kmeans(cd.get(), x, o);
      },
      py::arg("x"), py::arg("k"), py::arg("seed") = 0, py::arg("n_init") = 1, py::arg("max_iter") = 300, py::arg("tol") = 1e-4,
      py::arg("init") = "k-means++", py::arg("max_points_per_centroid") = KMeansOptions{}.max_points_per_centroid, py::arg("spherical") = false,
      py::arg("backend") = py::none(), py::arg("dispatcher") = py::none(),
      "k-means on float32 points (n, d): k-means++ (greedy) or random or given init, Lloyd iterations through the dispatcher, "
      "empty clusters moved to the farthest points, sub-sampling to k * max_points_per_centroid points (0: all) for training; "
      "labels and inertia always cover every point.");

  m.def(
      "read_corpus",
      [](const std::vector<std::string>& sources, const std::string& format) {
        Corpus c = read_corpus(sources, format);
        py::dict d;
        d["format"] = to_string(c.format);
        d["files"] = c.files;
        py::list formats;
        for (size_t i = 0; i < c.files.size(); ++i)
          formats.append(py::make_tuple(to_string(c.file_formats[i]), c.file_reasons[i], c.file_records[i]));
        d["file_formats"] = formats;
        d["records"] = c.records;
        return d;
      },
      py::arg("sources"), py::arg("format") = "auto",
      "The training readers: files, folders or globs in format auto (decided per file), text, fortune, jsonl or lines. Returns {format, files, "
      "file_formats: [(format, why, records)] per file, records}.");

  m.def(
      "embed_text",
      [](const std::vector<std::string>& records, int64_t dim, std::pair<int, int> char_ngrams, std::pair<int, int> word_ngrams, const py::object& dispatcher) {
        CallDispatcher cd(dispatcher, std::nullopt);  // without one, the environment's HYBRIT_THREADS / HYBRIT_BACKEND apply
        NgramEmbeddingOptions o;
        o.dim = dim;
        std::tie(o.char_min, o.char_max) = char_ngrams;
        std::tie(o.word_min, o.word_max) = word_ngrams;
        Tensor t;
        {
          py::gil_scoped_release release;
          t = embed_ngrams(cd.get(), records, o);
        }
        return copy_to_numpy<float>(t);
      },
      py::arg("records"), py::arg("dim") = 1024, py::arg("char_ngrams") = std::pair<int, int>{3, 5}, py::arg("word_ngrams") = std::pair<int, int>{1, 2},
      py::arg("dispatcher") = py::none(),
      "Model-free embeddings of text records: hashed character and word n-grams (inclusive length ranges, (0, 0) for none), "
      "TF-IDF weighted, L2-normalised. Returns (len(records), dim) float32.");

  m.def(
      "evaluate",
      [](const std::string& checkpoint, const py::object& data, const std::string& format, int64_t batch, int64_t max_tokens,
         std::optional<std::string> backend, const py::object& dispatcher) {
        std::vector<std::string> sources;
        if (py::isinstance<py::str>(data)) sources.push_back(data.cast<std::string>());
        else sources = data.cast<std::vector<std::string>>();
        CallDispatcher cd(dispatcher, backend);
        EvalOptions o;
        o.format = format, o.batch = batch, o.max_tokens = max_tokens;
        EvalResult r;
        {
          py::gil_scoped_release release;
          r = evaluate_checkpoint(cd.get(), find_checkpoint(checkpoint), sources, o);
        }
        return json_to_python(r.to_json());
      },
      py::arg("checkpoint"), py::arg("data"), py::arg("format") = EvalOptions{}.format, py::arg("batch") = EvalOptions{}.batch,
      py::arg("max_tokens") = EvalOptions{}.max_tokens, py::arg("backend") = py::none(), py::arg("dispatcher") = py::none(),
      "`hybrit eval` from Python: a checkpoint (file or run folder) scored on data (a path or a list: files, folders, globs). "
      "Returns {loss (nats per token), bits_per_token, bits_per_byte, perplexity, tokens, bytes, windows, read_as, ...}.");

  m.def("_fresh_seed", &fresh_seed, "A fresh random seed: what a request without a seed gets (every front end).");

  m.def(
      "embed_with_checkpoint",
      [](const std::vector<std::string>& records, const std::string& checkpoint, int64_t max_tokens, int64_t batch, std::optional<std::string> backend,
         const py::object& dispatcher) {
        CallDispatcher cd(dispatcher, backend);
        ModelEmbeddingOptions o;
        o.checkpoint = checkpoint, o.max_tokens = max_tokens, o.batch = batch;
        Tensor t;
        {
          py::gil_scoped_release release;
          t = embed_with_model(cd.get(), records, o);
        }
        return copy_to_numpy<float>(t);
      },
      py::arg("records"), py::arg("checkpoint"), py::arg("max_tokens") = 512, py::arg("batch") = 16, py::arg("backend") = py::none(),
      py::arg("dispatcher") = py::none(),
      "Model-based embeddings: each record's tokens (the first max_tokens) through a training checkpoint's model, final hidden "
      "states averaged, L2-normalised. Returns (len(records), model dim) float32.");

  m.def(
      "select",
      [](const py::object& x_obj, const std::string& strategy, std::optional<double> fraction, std::optional<int64_t> count, std::optional<double> eps,
         std::optional<int64_t> k, uint64_t seed, int max_iter, bool spherical, double report_eps, std::optional<std::string> backend,
         const py::object& dispatcher) {
        CallDispatcher cd(dispatcher, backend);
        Tensor x = view<float>(x_obj, "embeddings", 2, 2, "float32");
        SelectOptions so;
        so.strategy = parse_reduce_strategy(strategy, "strategy");
        so.fraction = fraction, so.count = count, so.eps = eps, so.seed = seed, so.report_eps = report_eps;
        KMeansOptions ko;
        const int64_t n = x.dim(0);
        ko.k = k ? *k : default_cluster_count(n);
        ko.seed = seed, ko.max_iter = max_iter, ko.spherical = spherical;
        KMeansResult clusters;
        Selection sel;
        {
          py::gil_scoped_release release;
          Dispatcher& d = cd.get();
          if (so.strategy != ReduceStrategy::random) clusters = kmeans(d, x, ko);
          sel = select_records(d, x, clusters, so);
        }
        py::dict out;
        out["kept"] = py::array_t<int64_t>(py::ssize_t(sel.kept.size()), sel.kept.data());
        out["distance"] = py::array_t<float>(py::ssize_t(sel.distance.size()), sel.distance.data());
        out["dup_score"] = py::array_t<float>(py::ssize_t(sel.dup_score.size()), sel.dup_score.data());
        out["cluster_size"] = py::array_t<int64_t>(py::ssize_t(sel.cluster_size.size()), sel.cluster_size.data());
        out["cluster_kept"] = py::array_t<int64_t>(py::ssize_t(sel.cluster_kept.size()), sel.cluster_kept.data());
        out["near_duplicates"] = sel.near_duplicates;
        out["near_duplicates_removed"] = sel.near_duplicates_removed;
        out["eps"] = sel.eps_used;
        out["kmeans"] = so.strategy == ReduceStrategy::random ? py::object(py::none()) : py::cast(clusters);
        return out;
      },
      py::arg("embeddings"), py::arg("strategy"), py::kw_only(), py::arg("fraction") = py::none(), py::arg("count") = py::none(), py::arg("eps") = py::none(),
      py::arg("k") = py::none(), py::arg("seed") = 1, py::arg("max_iter") = 100, py::arg("spherical") = true, py::arg("report_eps") = SelectOptions{}.report_eps,
      py::arg("backend") = py::none(), py::arg("dispatcher") = py::none(),
      "Which records to keep: clusters the (n, d) float32 embeddings with k-means (k defaults to round(sqrt(n))) and applies "
      "the strategy (nearest, balanced, semdedup, hard, random) for a target given as exactly one of fraction, count or "
      "(semdedup) eps. Returns a dict: kept (indices, ascending), distance, dup_score, cluster_size, cluster_kept, "
      "near_duplicates, near_duplicates_removed, eps, kmeans (a KMeansResult).");

  m.def(
      "reduce",
      [](const py::object& config, std::optional<std::string> out, const std::vector<std::string>& sets) {
        ReduceConfig cfg;
        if (py::isinstance<py::str>(config) || py::hasattr(config, "__fspath__")) cfg = load_reduce_config(py::str(config).cast<std::string>(), sets);
        else if (py::isinstance<py::dict>(config))
          cfg = parse_reduce_config(py::module_::import("json").attr("dumps")(config).cast<std::string>(), "<config dict>", sets);
        else throw py::type_error("config must be a path to a YAML file or a dict");
        if (!out) out = default_run_folder(cfg.source == "<config dict>" ? "reduce" : std::filesystem::path(cfg.source).stem().string());
        nlohmann::json report;
        {
          py::gil_scoped_release release;
          report = run_reduce(cfg, *out);
        }
        py::dict d = json_to_python(report);
        d["out_dir"] = *out;
        return d;
      },
      py::arg("config"), py::arg("out") = py::none(), py::arg("sets") = std::vector<std::string>{},
      "Runs `hybrit reduce` from Python: a config path or dict (see configs/reduce.yaml); writes the reduced corpus, "
      "selection.tsv and report.json into `out` and returns the report as a dict (with out_dir).");

  m.def("default_profile_path", &default_profile_path);
  m.attr("__version__") = HYBRIT_VERSION;
}
