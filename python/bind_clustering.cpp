// k-means, corpora, embeddings, selection and the whole reduction: hybrit.kmeans, read_corpus, embed_text, embed_with_checkpoint, select, reduce.
#include "python/common.hpp"

namespace hybrit::python {

void bind_clustering(py::module_& m) {
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
}

}  // namespace hybrit::python
