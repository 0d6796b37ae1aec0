#include <sys/stat.h>

#include <functional>
#include <set>

#include "test_support.hpp"
#include "model/config.hpp"

namespace hybrit::test {
namespace {

std::string error_of(const std::string& yaml, const std::vector<std::string>& sets = {}) {
  try {
    parse_train_config(yaml, "run.yaml", sets);
  } catch (const Error& e) {
    return e.what();
  }
  return "no error";
}

TEST(TrainConfig, ReadsEverySectionAndFillsDefaults) {
  const TrainConfig c = parse_train_config(
      "seed: 7\nmodel: {dim: 64, n_layers: 2, n_heads: 4, n_kv_heads: 2, ffn: relu2, quant: none, subln: true}\n"
      "data: {sources: [a, b], format: jsonl, val_fraction: 0.1}\ntrain: {steps: 30, batch: 4, on_nonfinite: skip}\n"
      "optim: {grad_clip: 0.5, schedule: {kind: wsd, warmup_steps: 3}, muon: {lr: 0.01}, adamw: {lr: 0.001, weight_decay: 0.1}}\n"
      "dispatch: {backend: c}\n",
      "run.yaml");
  EXPECT_EQ(c.seed, 7u);
  EXPECT_EQ(c.model.dim, 64);
  EXPECT_EQ(c.model.kv_heads(), 2);
  EXPECT_EQ(c.model.ffn, ModelConfig::Ffn::relu2);
  EXPECT_EQ(c.model.quant, ModelConfig::Quant::none);
  EXPECT_TRUE(c.model.subln);
  EXPECT_EQ(c.model.vocab_size, 257);  // from the byte tokenizer
  EXPECT_EQ(c.data.sources, (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(c.train.on_nonfinite, "skip");
  EXPECT_EQ(c.optim.schedule.kind, Schedule::Kind::wsd);
  EXPECT_EQ(c.optim.schedule.total_steps, 30);
  EXPECT_DOUBLE_EQ(c.optim.adamw.weight_decay, 0.1);
  EXPECT_EQ(c.dispatch.backend, BackendKind::c);
  // The resolved YAML reads back to the same configuration.
  const TrainConfig again = parse_train_config(c.to_yaml(), "resolved.yaml");
  EXPECT_EQ(again.to_yaml(), c.to_yaml());
}

// The training configs the project ships load, and their resolved YAML reads back the same.
TEST(TrainConfig, ShippedConfigsLoad) {
  for (const char* name : {"tiny.yaml", "small.yaml", "medium.yaml"}) {
    SCOPED_TRACE(name);
    const TrainConfig c = load_train_config(std::string(HYBRIT_SOURCE_DIR) + "/configs/" + name);
    EXPECT_EQ(parse_train_config(c.to_yaml(), "resolved.yaml").to_yaml(), c.to_yaml());
  }
  const TrainConfig medium = load_train_config(std::string(HYBRIT_SOURCE_DIR) + "/configs/medium.yaml");
  EXPECT_EQ(medium.model.context, 1024);
  EXPECT_EQ(medium.train.recompute, "none");
  const TrainConfig c = parse_train_config("train: {batch: 8, grad_accum: 4, recompute: attention}\noptim: {matrices: adamw}\n", "run.yaml");
  const TrainConfig again = parse_train_config(c.to_yaml(), "resolved.yaml");
  EXPECT_EQ(again.train.grad_accum, 4);
  EXPECT_EQ(again.train.recompute, "attention");
  EXPECT_EQ(again.optim.matrices, OptimizerConfig::Matrices::adamw);
}

// The field table is the schema: to_yaml writes exactly its keys (every conditional key on here),
// the help lists each with its default, and each key refuses a value of the wrong kind by name.
TEST(TrainConfig, TheFieldTableIsTheSchema) {
  const TrainConfig c = parse_train_config(
      "data: {tokenizer: bpe, vocab_size: 512, val_sources: [v.txt]}\n"
      "optim: {schedule: {total_steps: 9}, adamw: {embedding_lr: 0.1, head_lr: 0.2, norm_lr: 0.3, embedding_weight_decay: 0.4, "
      "head_weight_decay: 0.5, norm_weight_decay: 0.6}}\ndispatch: {backend: c}\n",
      "run.yaml");
  std::set<std::string> written;
  std::function<void(const YAML::Node&, const std::string&)> flatten = [&](const YAML::Node& n, const std::string& prefix) {
    for (const auto& kv : n) {
      const std::string key = prefix + kv.first.as<std::string>();
      if (kv.second.IsMap() && key != "dispatch") flatten(kv.second, key + ".");
      else written.insert(key);
    }
  };
  flatten(YAML::Load(c.to_yaml()), "");
  std::set<std::string> table;
  for (const ConfigField& f : train_config_fields()) table.insert(f.key);
  EXPECT_EQ(written, table);

  const std::string help = train_config_help();
  EXPECT_NE(help.find("  train.steps [1000]: "), std::string::npos) << help;
  EXPECT_NE(help.find("  model.ffn [swiglu]: "), std::string::npos) << help;
  EXPECT_NE(help.find("  optim.muon.lr [0.02]: "), std::string::npos) << help;
  for (const ConfigField& f : train_config_fields()) {
    SCOPED_TRACE(f.key);
    EXPECT_NE(help.find(std::string("  ") + f.key + " ["), std::string::npos);
    const char* wrong = f.kind == ConfigField::Kind::boolean ? "maybe"
                        : f.kind == ConfigField::Kind::paths ? "{a: 1}"
                        : f.kind == ConfigField::Kind::section ? "[1, 2]"
                        : f.kind == ConfigField::Kind::text ? "[1, 2]"
                                                             : "not-a-value";
    const std::string message = error_of("", {std::string(f.key) + "=" + wrong});
    EXPECT_NE(message.find(f.key), std::string::npos) << message;
  }
}

TEST(TrainConfig, SetOverridesApplyAndAreChecked) {
  const TrainConfig c = parse_train_config("train: {steps: 30}\n", "run.yaml", {"train.steps=5", "model.quant=none", "data.sources=[x]"});
  EXPECT_EQ(c.train.steps, 5);
  EXPECT_EQ(c.model.quant, ModelConfig::Quant::none);
  EXPECT_EQ(c.data.sources, (std::vector<std::string>{"x"}));
  EXPECT_EQ(error_of("", {"train.stepz=5"}),
            "--set train.stepz=5: train.stepz: unknown key (expected one of: batch, checkpoint_every, eval_batches, eval_every, grad_accum, keep_best, "
            "keep_checkpoints, log_every, on_nonfinite, recompute, sample_prompt, sample_temperature, sample_tokens, steps)");
  EXPECT_EQ(error_of("", {"model.dim=50"}), "--set model.dim=50: model.dim (50) must be divisible by model.n_heads (4)");
  EXPECT_EQ(error_of("", {"steps"}), "--set steps: expected key=value");
}

TEST(TrainConfig, BadInputNamesFileLineAndKey) {
  EXPECT_EQ(error_of("model:\n  dim: 64\n  layers: 2\n"),
            "run.yaml:3: model.layers: unknown key (expected one of: context, dim, ffn, ffn_hidden, n_heads, n_kv_heads, n_layers, norm_eps, quant, "
            "rope_theta, subln, tied_embeddings, vocab_size)");
  EXPECT_EQ(error_of("model:\n  dim: big\n"), "run.yaml:2: model.dim: expected an integer, got 'big'");
  EXPECT_EQ(error_of("model:\n  dim: 0\n"), "run.yaml:2: model.dim: expected an integer in [1, 65536], got 0");
  EXPECT_EQ(error_of("model:\n  n_heads: 4\n  dim: 50\n"), "run.yaml:3: model.dim (50) must be divisible by model.n_heads (4)");
  EXPECT_EQ(error_of("model:\n  n_heads: 6\n  n_kv_heads: 4\n  dim: 96\n"), "run.yaml:2: model.n_heads (6) must be divisible by model.n_kv_heads (4)");
  EXPECT_EQ(error_of("model:\n  context: 100000\n"), "run.yaml:2: model.context: expected an integer in [1, 65536], got 100000");
  EXPECT_EQ(error_of("model:\n  quant: binary\n"), "run.yaml:2: model.quant: expected one of ternary, none, got 'binary'");
  EXPECT_EQ(error_of("train:\n  steps: [1]\n"), "run.yaml:2: train.steps: expected an integer, got 'a list'");
  EXPECT_EQ(error_of("data:\n  val_fraction: 1.5\n"), "run.yaml:2: data.val_fraction: expected a number in (0, 1), got 1.5");
  EXPECT_EQ(error_of("model:\n  vocab_size: 1000\n"), "run.yaml:2: model.vocab_size: the byte tokenizer has 257 tokens, got 1000 (leave model.vocab_size out)");
  EXPECT_EQ(error_of("data:\n  tokenizer: bpe\n  vocab_size: 100\n"), "run.yaml:3: data.vocab_size: expected an integer in [320, 65536], got 100");
  EXPECT_EQ(parse_train_config("data: {tokenizer: bpe, vocab_size: 2048}\n", "run.yaml").model.vocab_size, 2048);
  EXPECT_EQ(error_of("optim:\n  schedule:\n    kind: linear\n"),
            "run.yaml:3: optim.schedule.kind: expected constant, cosine, wsd or bitnet_two_stage, got 'linear'");
  EXPECT_EQ(error_of("trian: {steps: 3}\n"), "run.yaml:1: trian: unknown key (expected one of: data, dispatch, model, optim, seed, train)");
  EXPECT_EQ(error_of("dispatch:\n  backend: gpu\n"), "run.yaml:2: dispatch.backend: expected c, tbb, cuda or auto, got 'gpu'");
  EXPECT_NE(error_of("model: [\n").find("run.yaml:2: YAML syntax error"), std::string::npos);
  EXPECT_EQ(error_of("train:\n  batch: 12\n  grad_accum: 5\n"),
            "run.yaml:3: train.grad_accum: train.batch (12) must split into 5 equal micro-batches; pick a divisor of it");
  EXPECT_EQ(error_of("train:\n  recompute: all\n"), "run.yaml:2: train.recompute: expected one of none, attention, block, got 'all'");
  EXPECT_EQ(parse_train_config("train: {batch: 12, grad_accum: 4, recompute: block}\n", "run.yaml").train.grad_accum, 4);
}

// Values the optimizer or the loop would take in silence before: each is refused at its key.
TEST(TrainConfig, ValuesOutsideTheirRangeAreRefusedAtTheirKey) {
  const std::pair<const char*, const char*> cases[] = {
      {"optim: {adamw: {lr: -0.1}}", "optim.adamw.lr: expected a number >= 0, got -0.1"},
      {"optim: {muon: {lr: -1}}", "optim.muon.lr: expected a number >= 0, got -1"},
      {"optim: {muon: {momentum: 1.5}}", "optim.muon.momentum: expected a number in [0, 1), got 1.5"},
      {"optim: {adamw: {eps: -1e-8}}", "optim.adamw.eps: expected a number > 0, got -1e-08"},
      {"optim: {adamw: {beta1: 1}}", "optim.adamw.beta1: expected a number in [0, 1), got 1"},
      {"optim: {schedule: {min_lr_ratio: 1.5}}", "optim.schedule.min_lr_ratio: expected a number in [0, 1], got 1.5"},
      {"optim: {schedule: {decay_fraction: 2}}", "optim.schedule.decay_fraction: expected a number in [0, 1], got 2"},
      {"optim: {muon: {ns_steps: 4294967297}}", "optim.muon.ns_steps: expected an integer in [1, 100], got 4294967297"},
      {"optim: {muon: {ns_steps: 2147483648}}", "optim.muon.ns_steps: expected an integer in [1, 100], got 2147483648"},
      {"optim: {grad_clip: -1}", "optim.grad_clip: expected a number >= 0, got -1"},
      {"model: {n_layers: 1000000000}", "model.n_layers: expected an integer in [1, 4096], got 1000000000"},
      {"model: {n_layers: 1e9}", "model.n_layers: expected an integer, got '1e9' (write it out in digits)"},
      {"model: {dim: 100000000000}", "model.dim: expected an integer in [1, 65536], got 100000000000"},
      {"model: {norm_eps: 0}", "model.norm_eps: expected a number in (0, 1], got 0"},
      {"train: {eval_batches: 1000000000}", "train.eval_batches: expected an integer in [1, 100000], got 1000000000"},
      {"train: {sample_tokens: 100000000}", "train.sample_tokens: expected an integer in [0, 1000000], got 100000000"},
      {"train: {batch: 100000000}", "train.batch: expected an integer in [1, 1048576], got 100000000"},
      {"train: {sample_temperature: .nan}", "train.sample_temperature: expected a number in [0, 100], got '.nan'"},
  };
  for (const auto& [text, message] : cases) EXPECT_EQ(error_of(std::string(text) + "\n"), cat("run.yaml:1: ", message)) << text;
}

TEST(TrainConfig, RepeatedKeysExtraDocumentsAndOddRootsAreRefused) {
  EXPECT_EQ(error_of("train:\n  steps: 1\ntrain:\n  batch: 2\n"), "run.yaml:3: train: given twice (first at line 1)");
  EXPECT_EQ(error_of("train:\n  steps: 1\n  steps: 2\n"), "run.yaml:3: train.steps: given twice (first at line 2)");
  EXPECT_EQ(error_of("train: {steps: 1}\n---\nmodel: {dim: 8}\n"), "run.yaml:2: a second YAML document (after ---); a config is one document");
  EXPECT_EQ(parse_train_config("---\n# one document, explicitly started\ntrain: {steps: 2}\n...\n", "run.yaml").train.steps, 2);
  // yaml-cpp's LoadAll never returns on this one (found by fuzz/fuzz_config).
  EXPECT_EQ(error_of(", cosine k-means, a\n"), "run.yaml: not a YAML mapping of sections (model:, data:, ...); nothing could be read from it");
  EXPECT_EQ(parse_train_config("# only a comment\n", "run.yaml").train.steps, 1000);  // an empty config is the defaults
  EXPECT_EQ(error_of("5\n", {"train.steps=1"}), "run.yaml:1: expected a mapping of sections at the top (model:, data:, ...), got the value '5'");
  EXPECT_EQ(error_of("- a\n- b\n"), "run.yaml:1: expected a mapping of sections at the top (model:, data:, ...), got a list");
  EXPECT_EQ(error_of("dispatch:\n  [a]: 1\n"), "run.yaml:2: dispatch: a key must be a plain name, got a list");
  EXPECT_EQ(error_of("", {"model.=5"}), "--set model.=5: the key has an empty part (expected section.key=value)");
}

TEST(TrainConfig, SetReachesTheDispatchSectionAndNamesItself) {
  const TrainConfig c = parse_train_config("dispatch: {backend: tbb}\n", "run.yaml", {"dispatch.backend=c", "dispatch.ops.matmul=auto"});
  EXPECT_EQ(c.dispatch.backend, BackendKind::c);
  EXPECT_TRUE(c.dispatch.per_op_auto.count(Op::matmul));
  EXPECT_EQ(error_of("", {"dispatch.backend=nonsense"}), "--set dispatch.backend=nonsense: dispatch.backend: expected c, tbb, cuda or auto, got 'nonsense'");
  EXPECT_EQ(error_of("", {"model={dim: 50}"}), "--set model={dim: 50}: model.dim (50) must be divisible by model.n_heads (4)");
  // The section travels in the resolved YAML, `auto` included.
  const TrainConfig again = parse_train_config(c.to_yaml(), "config.yaml");
  EXPECT_EQ(again.dispatch.backend, BackendKind::c);
  EXPECT_TRUE(again.dispatch.per_op_auto.count(Op::matmul));
}

TEST(ConfigFile, MissingFoldersDevicesAndFifosAreOneLineErrors) {
  TempDir dir;
  auto error_reading = [](const std::string& path) {
    try {
      schema::read_config_file(path);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_EQ(error_reading(""), "the config path is empty");
  EXPECT_EQ(error_reading(dir.file("none.yaml")), dir.file("none.yaml") + ": cannot open config file (No such file or directory)");
  EXPECT_EQ(error_reading("/dev/null"), "/dev/null: not a regular file (a character device); a config is a YAML file");
  EXPECT_EQ(error_reading(dir.path.string()), dir.path.string() + ": not a regular file (a folder); a config is a YAML file");
  const std::string fifo = dir.file("fifo");
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  EXPECT_EQ(error_reading(fifo), fifo + ": not a regular file (a FIFO); a config is a YAML file");  // and no wait for a writer
}

}  // namespace
}  // namespace hybrit::test
