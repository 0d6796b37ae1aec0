// hybrit.Generator's engine (_Generator; generate() and stream() are in hybrit/__init__.py), the sampling and engine defaults, fresh seeds.
#include "python/common.hpp"

namespace hybrit::python {

namespace {

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

}  // namespace

void bind_inference(py::module_& m) {
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


  m.def(
      "export_checkpoint",
      [](const std::string& checkpoint, const std::string& out, const std::string& format, const std::string& type, const std::string& name,
         const py::object& dispatcher) {
        CallDispatcher cd(dispatcher, std::nullopt);
        const std::string path = find_checkpoint(checkpoint);
        py::dict d;
        if (export_as_gguf(format, out)) {
          GgufExportOptions o;
          o.type = type, o.name = name;
          GgufExportReport r;
          {
            py::gil_scoped_release release;
            r = export_gguf(cd.get(), path, out, o);
          }
          d["format"] = "gguf", d["architecture"] = r.architecture, d["tensors"] = r.tensors, d["bytes"] = r.file_bytes, d["notes"] = r.notes;
        } else {
          int64_t bytes = 0;
          {
            py::gil_scoped_release release;
            bytes = export_for_inference(cd.get(), path, out);
          }
          d["format"] = "hyb", d["weight_bytes"] = bytes;
        }
        return d;
      },
      py::arg("checkpoint"), py::arg("out"), py::arg("format") = "auto", py::arg("type") = GgufExportOptions{}.type, py::arg("name") = "",
      py::arg("dispatcher") = py::none(),
      "hybrit checkpoint export from Python: a training checkpoint (or run folder, or .hyb export) as the packed inference file (format hyb) or "
      "as GGUF for llama.cpp (format gguf; auto: by out's extension). type: tq2_0, tq1_0 or f16 (gguf). Returns what was written.");

  m.def("_fresh_seed", &fresh_seed, "A fresh random seed: what a request without a seed gets (every front end).");
}

}  // namespace hybrit::python
