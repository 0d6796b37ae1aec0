// HDF5 checkpoints: one file holds everything a run needs to continue bit for bit. Layout
// (readable with h5py; documented in model/README.md):
//   attributes of /: format "hybrit-checkpoint", format_version 2, step, tokens_seen, seed,
//                     config (resolved YAML), tokenizer (JSON), muon_momentum_convention,
//                     meta_fnv1a64 (over all of them, length-prefixed, in this order)
//   /params/<name>, /optim/adam_m/<name>, /optim/adam_v/<name>, /optim/muon_momentum/<name>:
//                     f32 datasets in the parameter's shape, each with an attribute fnv1a64
//   /tokenizer_model: the BPE model's bytes (u8), when the tokenizer is BPE
// Written to a temporary file in the same folder, flushed and fsynced, then renamed, so a crash
// mid-write leaves the previous checkpoint intact.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "model/config.hpp"
#include "model/text.hpp"
#include "model/model.hpp"

namespace hybrit {

struct CheckpointMeta {
  int64_t step = 0;
  int64_t tokens_seen = 0;
  uint64_t seed = 0;
  std::string config_yaml;
  std::string tokenizer_json;
  std::string tokenizer_model;  // bytes; empty for the byte tokenizer
  int format_version = 0;       // as read (0: not read from a file)
};

// Version 2 added meta_fnv1a64, one checksum over the root attributes. Version 3 keeps only the
// optimizer state each parameter uses (Muon's momentum for the block matrices under Muon, AdamW's
// moments for the rest), not all three slots for every parameter. Versions 1 and 2 still load.
inline constexpr int kCheckpointVersion = 3;

// The datasets a checkpoint of this version holds for the table: "params/<name>" for every
// parameter, then its optimizer state ("optim/adam_m/<name>", "optim/adam_v/<name>" or
// "optim/muon_momentum/<name>"). Versions 1 and 2 hold all three slots for every parameter.
std::vector<std::string> checkpoint_dataset_names(const ParamTable& table, OptimizerConfig::Matrices matrices, int version = kCheckpointVersion);
// Version 2 added meta_fnv1a64 on the root and attrs_fnv1a64 (scale and cols) on packed datasets.
inline constexpr int kInferenceExportVersion = 2;

// `matrices`: which optimizer the block matrices use (optim.matrices), so which state is kept.
void save_checkpoint(const std::string& path, ParamTable& table, const CheckpointMeta& meta, OptimizerConfig::Matrices matrices);
// Checks the format, version, every dataset's presence, shape and checksum against `table`'s
// layout, then fills the table's buffers. Any problem: an Error naming the file and what is wrong,
// and the table is left unchanged.
CheckpointMeta load_checkpoint(const std::string& path, ParamTable& table);

struct CheckpointDataset {
  std::string name;   // e.g. "params/blocks.0.wq"
  Shape shape;
  uint64_t checksum = 0;
  bool checksum_ok = false;
};
// Reads everything without a table (for `hybrit checkpoint inspect`): metadata and every dataset
// with its checksum verified. Errors only when the file is unreadable or not a checkpoint.
CheckpointMeta inspect_checkpoint(const std::string& path, std::vector<CheckpointDataset>* datasets);

// A checkpoint's own config, model.vocab_size taken from its tokenizer. A config or tokenizer
// attribute that does not parse is a damaged file (ErrorKind::corrupt_data), not a config error.
TrainConfig checkpoint_config(const CheckpointMeta& meta, const std::string& path);
// What keeps `datasets` from being a checkpoint of `config`: missing, misshapen and unexpected
// datasets in any of the four buffer groups, and checksum failures. Empty when all is well.
std::vector<std::string> checkpoint_layout_problems(const TrainConfig& config, const std::vector<CheckpointDataset>& datasets, int version);
// Reads and checks everything (metadata checksum, layout, every dataset's checksum) without
// loading: an Error naming the first problem. Returns the metadata.
CheckpointMeta verify_checkpoint(const std::string& path);

// Every f32 dataset of a checkpoint by name ("params/tok_emb", "optim/adam_m/..."), checksums
// verified and the layout compared with the config (an Error naming the first problem).
struct NamedArray {
  std::string name;
  Shape shape;
  std::vector<float> values;
};
std::vector<NamedArray> read_checkpoint_arrays(const std::string& path, CheckpointMeta* meta);

// The packed inference file of a checkpoint (HDF5, format "hybrit-inference", version 2): the
// config, the tokenizer (and its BPE model), and per parameter either `<name>` (f32: embedding,
// head, norm gains, and every matrix of a quant-none model) or, for the BitLinear weights of a
// ternary model, `<name>.packed` (u8, rows x ceil(cols / 4), code q + 1 per 2 bits, as
// pack_ternary) with attributes `scale` (the absmean scale, f32), `cols` and attrs_fnv1a64 (over
// both). Version 2: meta_fnv1a64 on the root covers format, version, step, config, tokenizer. Quantization and
// packing go through `dispatcher`. Returns the bytes of weights written.
int64_t export_for_inference(Dispatcher& dispatcher, const std::string& checkpoint, const std::string& out_path);

inline constexpr const char* kTrainingCheckpointFormat = "hybrit-checkpoint";
inline constexpr const char* kInferenceExportFormat = "hybrit-inference";
// The `format` attribute of a hybrit HDF5 file; an Error naming the file for anything else.
std::string checkpoint_format(const std::string& path);

// An export file read back, every checksum verified: the config (vocab_size set from the
// tokenizer), the tokenizer, the f32 parameters and the packed BitLinear weights by name.
struct InferenceExport {
  TrainConfig config;
  CheckpointMeta meta;  // step, config and tokenizer; an export keeps no seed or tokens_seen
  std::unique_ptr<Tokenizer> tokenizer;
  std::map<std::string, NamedArray> f32;
  struct Packed {
    int64_t rows = 0, cols = 0;
    float scale = 1.0f;
    std::vector<uint8_t> codes;  // rows x ceil(cols / 4), as pack_ternary writes them
  };
  std::map<std::string, Packed> packed;
};
InferenceExport read_inference_export(const std::string& path);

// A training checkpoint's model, ready to run forward: its resolved config, its tokenizer (rebuilt
// from the BPE model bytes it carries) and the model with every parameter loaded (checksums
// verified; a missing or misshapen parameter is an Error naming it).
struct CheckpointModel {
  TrainConfig config;
  CheckpointMeta meta;
  std::unique_ptr<Tokenizer> tokenizer;
  std::unique_ptr<Model> model;
};
CheckpointModel load_checkpoint_model(Dispatcher& dispatcher, const std::string& path);

}  // namespace hybrit
