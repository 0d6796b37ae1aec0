// hybrit.Model, hybrit.Trainer, train, evaluate, _load_checkpoint.
#include "python/common.hpp"

namespace hybrit::python {

namespace {

ModelConfig model_config_from(const py::dict& d) { return parse_model_config(YAML::Load(config_json(d)), "Model(config)"); }

// What model_config_from reads back: every key of a `model:` section, resolved, typed by the
// config table's kinds.
py::dict model_config_dict(const ModelConfig& c) {
  const YAML::Node node = model_config_node(c);
  py::dict d;
  for (const ConfigField& f : train_config_fields()) {
    const std::string key = f.key;
    if (key.rfind("model.", 0) != 0) continue;
    const std::string name = key.substr(6);
    const YAML::Node v = node[name];
    switch (f.kind) {
      case ConfigField::Kind::integer: d[name.c_str()] = v.as<int64_t>(); break;
      case ConfigField::Kind::number: d[name.c_str()] = v.as<double>(); break;
      case ConfigField::Kind::boolean: d[name.c_str()] = v.as<bool>(); break;
      default: d[name.c_str()] = v.as<std::string>(); break;
    }
  }
  return d;
}

// A model with its own dispatcher; parameters and gradients are numpy views into its buffers.
py::dict table_views(const py::object& owner, ParamTable& t, bool grads);


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

void bind_training(py::module_& m) {
  py::class_<PyModel>(m, "Model", R"doc(
The BitNet b1.58 transformer with hand-written backward (model/model.hpp).

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
}

}  // namespace hybrit::python
