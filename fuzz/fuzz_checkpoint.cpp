// libFuzzer target: the checkpoint and export readers. The input drives a series of edits to a
// valid checkpoint and its export, made through the HDF5 API: hostile metadata (written with a
// valid checksum, so the config, tokenizer and layout checks behind it run), attributes rewritten,
// datasets deleted, reshaped or given other values and checksums, bytes flipped inside dataset
// data. Every reader must then give its result or one hybrit::Error. libhdf5's own file-format
// parser is not fuzzed here (raw bytes anywhere in the file would mostly test it, not hybrit).
#include <fuzzer/FuzzedDataProvider.h>
#include <hdf5.h>
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "model/checkpoint.hpp"
#include "training/trainer.hpp"

namespace {

using namespace hybrit;
namespace fs = std::filesystem;


struct Base {
  fs::path dir = fs::temp_directory_path() / ("hybrit-fuzz-" + std::to_string(::getpid()));
  std::string checkpoint, exported;
  TrainConfig config;
  CheckpointMeta meta;
  ParamTable table;
  std::vector<std::string> dataset_names;
  Base() {
    fs::create_directories(dir);
    config = parse_train_config("model: {dim: 8, n_layers: 1, n_heads: 2, context: 8}\n", "base.yaml");
    Model::declare_parameters(config.model, table);
    table.allocate();
    for (int64_t i = 0; i < table.numel(); ++i) table.params().data<float>()[i] = float(i % 7) * 0.25f - 0.5f;
    meta.step = 3, meta.tokens_seen = 3 * 12 * 8, meta.seed = 1;
    meta.config_yaml = config.to_yaml();
    meta.tokenizer_json = R"({"kind": "byte-v1", "vocab_size": 257, "end_of_record": 256})";
    checkpoint = (dir / "base.h5").string();
    save_checkpoint(checkpoint, table, meta, config.optim.matrices);
    exported = (dir / "base.hyb").string();
    Dispatcher d;
    export_for_inference(d, checkpoint, exported);
    dataset_names = checkpoint_dataset_names(table, config.optim.matrices);
  }
  ~Base() { fs::remove_all(dir); }
};

void set_int_attr(hid_t file, const char* name, int64_t v) {
  if (H5Aexists(file, name) > 0) H5Adelete(file, name);
  const hid_t space = H5Screate(H5S_SCALAR);
  const hid_t a = H5Acreate2(file, name, H5T_NATIVE_INT64, space, H5P_DEFAULT, H5P_DEFAULT);
  if (a >= 0) H5Awrite(a, H5T_NATIVE_INT64, &v), H5Aclose(a);
  H5Sclose(space);
}

void set_string_attr(hid_t file, const char* name, const std::string& v) {
  if (H5Aexists(file, name) > 0) H5Adelete(file, name);
  const hid_t type = H5Tcopy(H5T_C_S1);
  H5Tset_size(type, H5T_VARIABLE);
  const hid_t space = H5Screate(H5S_SCALAR);
  const hid_t a = H5Acreate2(file, name, type, space, H5P_DEFAULT, H5P_DEFAULT);
  const char* p = v.c_str();
  if (a >= 0) H5Awrite(a, type, &p), H5Aclose(a);
  H5Sclose(space), H5Tclose(type);
}

// One edit of an open file, chosen by the input.
void edit(FuzzedDataProvider& in, hid_t file, const std::string& path, const std::vector<std::string>& names) {
  const std::string name = names[in.ConsumeIntegralInRange<size_t>(0, names.size() - 1)];
  switch (in.ConsumeIntegralInRange<int>(0, 6)) {
    case 0: set_int_attr(file, in.PickValueInArray({"step", "tokens_seen", "seed", "format_version", "meta_fnv1a64"}), in.ConsumeIntegral<int64_t>()); break;
    case 1: set_string_attr(file, in.PickValueInArray({"config", "tokenizer", "format", "muon_momentum_convention"}), in.ConsumeRandomLengthString(512)); break;
    case 2: if (H5Lexists(file, name.c_str(), H5P_DEFAULT) > 0) H5Ldelete(file, name.c_str(), H5P_DEFAULT); break;
    case 3: {  // another shape and values under the same name
      if (H5Lexists(file, name.c_str(), H5P_DEFAULT) > 0) H5Ldelete(file, name.c_str(), H5P_DEFAULT);
      const hsize_t dims[2] = {in.ConsumeIntegralInRange<hsize_t>(0, 40), in.ConsumeIntegralInRange<hsize_t>(1, 40)};
      const int rank = in.ConsumeIntegralInRange<int>(1, 2);
      const hid_t space = H5Screate_simple(rank, dims, nullptr);
      const hid_t lcpl = H5Pcreate(H5P_LINK_CREATE);
      H5Pset_create_intermediate_group(lcpl, 1);
      const hid_t ds = H5Dcreate2(file, name.c_str(), in.ConsumeBool() ? H5T_IEEE_F32LE : H5T_STD_U8LE, space, lcpl, H5P_DEFAULT, H5P_DEFAULT);
      if (ds >= 0) {
        std::vector<float> v(size_t(dims[0] * (rank == 2 ? dims[1] : 1)), in.ConsumeFloatingPoint<float>());
        if (!v.empty()) H5Dwrite(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data());
        if (in.ConsumeBool()) set_int_attr(ds, "fnv1a64", in.ConsumeIntegral<int64_t>());
        H5Dclose(ds);
      }
      H5Pclose(lcpl), H5Sclose(space);
      break;
    }
    case 4: {  // a dataset's checksum, or a packed weight's scale or column count
      const hid_t ds = H5Lexists(file, name.c_str(), H5P_DEFAULT) > 0 ? H5Dopen2(file, name.c_str(), H5P_DEFAULT) : -1;
      if (ds >= 0) set_int_attr(ds, in.PickValueInArray({"fnv1a64", "cols", "attrs_fnv1a64"}), in.ConsumeIntegral<int64_t>()), H5Dclose(ds);
      break;
    }
    case 5: {  // a flipped byte inside a dataset's data (the file's structure stays valid)
      const hid_t ds = H5Lexists(file, name.c_str(), H5P_DEFAULT) > 0 ? H5Dopen2(file, name.c_str(), H5P_DEFAULT) : -1;
      if (ds < 0) break;
      const haddr_t offset = H5Dget_offset(ds);
      const hsize_t bytes = H5Dget_storage_size(ds);
      H5Dclose(ds);
      if (offset == HADDR_UNDEF || bytes == 0) break;
      H5Fflush(file, H5F_SCOPE_GLOBAL);
      std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
      f.seekp(std::streamoff(offset + in.ConsumeIntegralInRange<hsize_t>(0, bytes - 1)));
      f.put(char(in.ConsumeIntegral<uint8_t>()));
      break;
    }
    default: H5Gunlink(file, in.PickValueInArray({"params", "optim", "optim/adam_m", "tokenizer_model"})); break;
  }
}

void read_everything(const std::string& path) {
  try {
    checkpoint_format(path);
  } catch (const Error&) {
  }
  try {
    std::vector<CheckpointDataset> datasets;
    const CheckpointMeta meta = inspect_checkpoint(path, &datasets);
    checkpoint_layout_problems(checkpoint_config(meta, path), datasets, meta.format_version);
  } catch (const Error&) {
  }
  try {
    verify_checkpoint(path);
  } catch (const Error&) {
  }
  try {
    read_checkpoint_arrays(path, nullptr);
  } catch (const Error&) {
  }
  try {
    Dispatcher d;
    load_checkpoint_model(d, path);
  } catch (const Error&) {
  }
  try {
    read_inference_export(path);
  } catch (const Error&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Base base;
  FuzzedDataProvider in(data, size);
  const bool exported = in.ConsumeBool();
  const std::string path = (base.dir / (exported ? "work.hyb" : "work.h5")).string();
  fs::copy_file(exported ? base.exported : base.checkpoint, path, fs::copy_options::overwrite_existing);
  if (!exported && in.ConsumeBool()) {  // hostile metadata behind a valid checksum
    CheckpointMeta meta = base.meta;
    meta.step = in.ConsumeIntegral<int64_t>();
    if (in.ConsumeBool()) meta.config_yaml = in.ConsumeRandomLengthString(2048);
    if (in.ConsumeBool()) meta.tokenizer_json = in.ConsumeRandomLengthString(256);
    if (in.ConsumeBool()) meta.tokenizer_model = in.ConsumeRandomLengthString(256);
    save_checkpoint(path, base.table, meta, base.config.optim.matrices);
  }
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  const hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  if (file >= 0) {
    std::vector<std::string> names = base.dataset_names;
    if (exported) names = {"tok_emb", "blocks.0.wq.packed", "blocks.0.w_up.packed", "final_norm", "head", "blocks.0.attn_norm"};
    for (int edits = in.ConsumeIntegralInRange<int>(0, 4); edits > 0; --edits) edit(in, file, path, names);
    H5Fclose(file);
  }
  read_everything(path);
  return 0;
}
