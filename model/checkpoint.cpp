#include "model/checkpoint.hpp"
#include "model/config.hpp"
#include "core/hash.hpp"

#include <fcntl.h>
#include <hdf5.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <cstring>
#include <filesystem>
#include <map>
#include <memory>

namespace hybrit {

namespace fs = std::filesystem;

namespace {

constexpr const char* kFormat = kTrainingCheckpointFormat;
constexpr const char* kMomentumConvention = "ema: m = b m + (1 - b) g; nesterov: u = b m + (1 - b) g";
const char* const kBuffers[] = {"params", "optim/adam_m", "optim/adam_v", "optim/muon_momentum"};

// HDF5 handles closed on scope exit.
struct Handle {
  hid_t id;
  herr_t (*close)(hid_t);
  Handle(hid_t i, herr_t (*c)(hid_t)) : id(i), close(c) {}
  ~Handle() {
    if (id >= 0) close(id);
  }
  Handle(Handle&& o) noexcept : id(o.id), close(o.close) { o.id = -1; }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  operator hid_t() const { return id; }
};

void quiet_hdf5() { H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr); }  // errors become our messages

void check(herr_t status, const std::string& path, const std::string& what) {
  if (status < 0) fail(ErrorKind::io, path, ": HDF5 failed to ", what);
}

void write_scalar_attr(hid_t obj, const char* name, hid_t type, const void* value, const std::string& path) {
  Handle space(H5Screate(H5S_SCALAR), H5Sclose);
  Handle attr(H5Acreate2(obj, name, type, space, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  check(attr.id, path, cat("create attribute ", name));
  check(H5Awrite(attr, type, value), path, cat("write attribute ", name));
}

void write_string_attr(hid_t obj, const char* name, const std::string& value, const std::string& path) {
  Handle type(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_size(type, H5T_VARIABLE);
  H5Tset_cset(type, H5T_CSET_UTF8);
  const char* p = value.c_str();
  write_scalar_attr(obj, name, type, &p, path);
}

bool has_attr(hid_t obj, const char* name) { return H5Aexists(obj, name) > 0; }

template <class T>
T read_scalar_attr(hid_t obj, const char* name, hid_t type, const std::string& path) {
  if (!has_attr(obj, name)) fail(ErrorKind::corrupt_data, path, ": attribute ", name, " is missing");
  Handle attr(H5Aopen(obj, name, H5P_DEFAULT), H5Aclose);
  T v{};
  if (attr.id < 0 || H5Aread(attr, type, &v) < 0) fail(ErrorKind::corrupt_data, path, ": attribute ", name, " is unreadable");
  return v;
}

std::string read_string_attr(hid_t obj, const char* name, const std::string& path) {
  if (!has_attr(obj, name)) fail(ErrorKind::corrupt_data, path, ": attribute ", name, " is missing");
  Handle attr(H5Aopen(obj, name, H5P_DEFAULT), H5Aclose);
  Handle type(H5Aget_type(attr), H5Tclose);
  if (H5Tget_class(type) != H5T_STRING) fail(ErrorKind::corrupt_data, path, ": attribute ", name, " is not a string");
  Handle mem(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_cset(mem, H5Tget_cset(type));  // HDF5 converts no string between character sets
  if (H5Tis_variable_str(type) > 0) {
    H5Tset_size(mem, H5T_VARIABLE);
    char* p = nullptr;
    if (H5Aread(attr, mem, &p) < 0 || !p) fail(ErrorKind::corrupt_data, path, ": attribute ", name, " is unreadable");
    std::string s(p);
    H5free_memory(p);
    return s;
  }
  const size_t n = H5Tget_size(type);
  H5Tset_size(mem, n);
  std::string s(n, '\0');
  if (H5Aread(attr, mem, s.data()) < 0) fail(ErrorKind::corrupt_data, path, ": attribute ", name, " is unreadable");
  return s.substr(0, s.find('\0'));
}

Shape dataset_shape(hid_t ds) {
  Handle space(H5Dget_space(ds), H5Sclose);
  const int rank = H5Sget_simple_extent_ndims(space);
  std::vector<hsize_t> dims(size_t(std::max(rank, 0)));
  if (rank > 0) H5Sget_simple_extent_dims(space, dims.data(), nullptr);
  return Shape(dims.begin(), dims.end());
}

// The name of link i of a group (in name order).
std::string link_name(hid_t group, hsize_t i) {
  const ssize_t len = H5Lget_name_by_idx(group, ".", H5_INDEX_NAME, H5_ITER_INC, i, nullptr, 0, H5P_DEFAULT);
  std::string name(size_t(std::max<ssize_t>(len, 0)), '\0');
  H5Lget_name_by_idx(group, ".", H5_INDEX_NAME, H5_ITER_INC, i, name.data(), name.size() + 1, H5P_DEFAULT);
  return name;
}

// A u8 dataset with its fnv1a64 checksum attribute; returned open for more attributes.
Handle write_u8_dataset(hid_t file, const std::string& name, const void* data, const std::vector<hsize_t>& dims, const std::string& path) {
  Handle space(H5Screate_simple(int(dims.size()), dims.data(), nullptr), H5Sclose);
  Handle ds(H5Dcreate2(file, name.c_str(), H5T_STD_U8LE, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Dclose);
  check(ds.id, path, cat("create dataset ", name));
  check(H5Dwrite(ds, H5T_NATIVE_UINT8, H5S_ALL, H5S_ALL, H5P_DEFAULT, data), path, cat("write dataset ", name));
  size_t n = 1;
  for (hsize_t e : dims) n *= size_t(e);
  const uint64_t sum = fnv1a64(data, n);
  write_scalar_attr(ds, "fnv1a64", H5T_NATIVE_UINT64, &sum, path);
  return ds;
}

// A u8 dataset's bytes, its checksum compared. Without a checksum attribute it is refused when
// `checksum_required` (exports written before the tokenizer model carried one have none).
std::vector<uint8_t> read_u8_dataset(hid_t ds, const std::string& name, const std::string& path, bool checksum_required) {
  Handle space(H5Dget_space(ds), H5Sclose);
  std::vector<uint8_t> bytes(size_t(std::max<hssize_t>(H5Sget_simple_extent_npoints(space), 0)));
  if (H5Dread(ds, H5T_NATIVE_UINT8, H5S_ALL, H5S_ALL, H5P_DEFAULT, bytes.data()) < 0)
    fail(ErrorKind::corrupt_data, path, ": dataset ", name, " is unreadable (truncated file?)");
  if (!has_attr(ds, "fnv1a64")) {
    if (checksum_required) fail(ErrorKind::corrupt_data, path, ": dataset ", name, " has no checksum");
  } else if (fnv1a64(bytes.data(), bytes.size()) != read_scalar_attr<uint64_t>(ds, "fnv1a64", H5T_NATIVE_UINT64, path)) {
    fail(ErrorKind::corrupt_data, path, ": dataset ", name, " fails its checksum (the file is damaged)");
  }
  return bytes;
}

// One checksum over every root attribute, each length-prefixed so no two attribute lists hash
// alike by moving bytes between neighbours. A flipped byte in `step` or the config text would
// otherwise be taken at its word ("done after 4294967336 steps").
uint64_t metadata_checksum(const std::vector<std::string>& values) {
  uint64_t h = kFnv1aOffset;
  for (const auto& v : values) {
    const uint64_t n = v.size();
    h = fnv1a64(&n, sizeof n, h);
    h = fnv1a64(v.data(), v.size(), h);
  }
  return h;
}

// Root attribute lists: what a checkpoint's and an export's metadata checksums cover.
std::vector<std::string> checkpoint_metadata(const std::string& format, int version, const CheckpointMeta& m, const std::string& convention) {
  return {format, cat(version), cat(m.step), cat(m.tokens_seen), cat(m.seed), m.config_yaml, m.tokenizer_json, convention};
}
std::vector<std::string> export_metadata(const std::string& format, int version, const CheckpointMeta& m) {
  return {format, cat(version), cat(m.step), m.config_yaml, m.tokenizer_json};
}

uint64_t packed_attrs_checksum(float scale, int64_t cols) { return fnv1a64(&cols, sizeof cols, fnv1a64(&scale, sizeof scale)); }

void check_metadata(hid_t file, const std::vector<std::string>& values, const std::string& path) {
  const uint64_t expect = read_scalar_attr<uint64_t>(file, "meta_fnv1a64", H5T_NATIVE_UINT64, path);
  if (metadata_checksum(values) != expect)
    fail(ErrorKind::corrupt_data, path, ": the metadata (step, seed, config, tokenizer) fails its checksum (the file is damaged)");
}

// The tokenizer a file carries: byte-level, or BPE rebuilt from its model bytes.
std::unique_ptr<Tokenizer> tokenizer_of(const CheckpointMeta& meta, const std::string& path) {
  if (meta.tokenizer_model.empty()) return std::make_unique<ByteTokenizer>();
  return bpe_tokenizer_from_bytes(meta.tokenizer_model, path + " (its tokenizer)");
}

void write_dataset(hid_t file, const std::string& name, const float* data, const Shape& shape, const std::string& path) {
  std::vector<hsize_t> dims(shape.begin(), shape.end());
  Handle space(H5Screate_simple(int(dims.size()), dims.data(), nullptr), H5Sclose);
  Handle lcpl(H5Pcreate(H5P_LINK_CREATE), H5Pclose);
  H5Pset_create_intermediate_group(lcpl, 1);
  Handle ds(H5Dcreate2(file, name.c_str(), H5T_IEEE_F32LE, space, lcpl, H5P_DEFAULT, H5P_DEFAULT), H5Dclose);
  check(ds.id, path, cat("create dataset ", name));
  check(H5Dwrite(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, data), path, cat("write dataset ", name));
  int64_t n = 1;
  for (int64_t e : shape) n *= e;
  const uint64_t sum = fnv1a64(data, size_t(n) * sizeof(float));
  write_scalar_attr(ds, "fnv1a64", H5T_NATIVE_UINT64, &sum, path);
}

// Reads a float dataset, checking shape and checksum; `out` is written only when all is well.
void read_dataset(hid_t file, const std::string& name, const Shape& expect, float* out, const std::string& path) {
  if (H5Lexists(file, name.c_str(), H5P_DEFAULT) <= 0) fail(ErrorKind::corrupt_data, path, ": dataset ", name, " is missing");
  Handle ds(H5Dopen2(file, name.c_str(), H5P_DEFAULT), H5Dclose);
  if (ds.id < 0) fail(ErrorKind::corrupt_data, path, ": dataset ", name, " cannot be opened");
  const Shape got = dataset_shape(ds);
  if (got != expect) fail(ErrorKind::corrupt_data, path, ": dataset ", name, " has shape ", shape_str(got), ", the model needs ", shape_str(expect));
  int64_t n = 1;
  for (int64_t e : expect) n *= e;
  std::vector<float> buf(static_cast<size_t>(n));
  if (H5Dread(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf.data()) < 0)
    fail(ErrorKind::corrupt_data, path, ": dataset ", name, " is unreadable (truncated file?)");
  const uint64_t expect_sum = read_scalar_attr<uint64_t>(ds, "fnv1a64", H5T_NATIVE_UINT64, path);
  if (fnv1a64(buf.data(), buf.size() * sizeof(float)) != expect_sum)
    fail(ErrorKind::corrupt_data, path, ": dataset ", name, " fails its checksum (the file is damaged)");
  std::memcpy(out, buf.data(), buf.size() * sizeof(float));
}

// (buffer, parameter) pairs a checkpoint of `version` holds, in file order.
std::vector<std::pair<int, const ParamSlice*>> layout(const ParamTable& table, OptimizerConfig::Matrices matrices, int version) {
  std::vector<std::pair<int, const ParamSlice*>> out;
  for (int b = 0; b < 4; ++b)
    for (const auto& s : table.slices()) {
      const bool muon = steps_with_muon(s, matrices);
      if (version < 3 || b == 0 || (b == 3) == muon) out.emplace_back(b, &s);
    }
  return out;
}

Tensor& buffer_of(ParamTable& t, int which) {
  switch (which) {
    case 0: return t.params();
    case 1: return t.adam_m();
    case 2: return t.adam_v();
    default: return t.muon_momentum();
  }
}

void fsync_path(const std::string& path, int flags) {
  const int fd = ::open(path.c_str(), flags);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

hid_t open_checkpoint(const std::string& path) {
  quiet_hdf5();
  if (!fs::exists(path)) fail(ErrorKind::io, path, ": no such checkpoint");
  if (H5Fis_hdf5(path.c_str()) <= 0) fail(ErrorKind::corrupt_data, path, ": not an HDF5 file (truncated or damaged?)");
  const hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  if (file < 0) fail(ErrorKind::corrupt_data, path, ": cannot be opened as HDF5 (truncated or damaged?)");
  return file;
}

CheckpointMeta read_meta(hid_t file, const std::string& path) {
  if (!has_attr(file, "format") || read_string_attr(file, "format", path) != kFormat)
    fail(ErrorKind::corrupt_data, path, ": not a hybrit checkpoint (attribute format is not '", kFormat, "')");
  const int version = read_scalar_attr<int>(file, "format_version", H5T_NATIVE_INT, path);
  if (version < 1 || version > kCheckpointVersion)
    fail(ErrorKind::unsupported, path, ": checkpoint format version ", version, ", this hybrit reads versions 1 to ", kCheckpointVersion);
  CheckpointMeta m;
  m.format_version = version;
  m.step = read_scalar_attr<int64_t>(file, "step", H5T_NATIVE_INT64, path);
  m.tokens_seen = read_scalar_attr<int64_t>(file, "tokens_seen", H5T_NATIVE_INT64, path);
  m.seed = read_scalar_attr<uint64_t>(file, "seed", H5T_NATIVE_UINT64, path);
  m.config_yaml = read_string_attr(file, "config", path);
  m.tokenizer_json = read_string_attr(file, "tokenizer", path);
  if (version >= 2)  // version 1 files, written before the metadata had a checksum, are read as they are
    check_metadata(file, checkpoint_metadata(kFormat, version, m, read_string_attr(file, "muon_momentum_convention", path)), path);
  if (m.step < 0 || m.tokens_seen < 0) fail(ErrorKind::corrupt_data, path, ": step ", m.step, " and tokens_seen ", m.tokens_seen, " cannot be negative");
  if (H5Lexists(file, "tokenizer_model", H5P_DEFAULT) > 0) {
    Handle ds(H5Dopen2(file, "tokenizer_model", H5P_DEFAULT), H5Dclose);
    const std::vector<uint8_t> bytes = read_u8_dataset(ds, "tokenizer_model", path, true);
    m.tokenizer_model.assign(bytes.begin(), bytes.end());
  }
  return m;
}

}  // namespace

std::vector<std::string> checkpoint_dataset_names(const ParamTable& table, OptimizerConfig::Matrices matrices, int version) {
  std::vector<std::string> names;
  for (const auto& [b, s] : layout(table, matrices, version)) names.push_back(cat(kBuffers[b], "/", s->name));
  return names;
}

void save_checkpoint(const std::string& path, ParamTable& table, const CheckpointMeta& meta, OptimizerConfig::Matrices matrices) {
  quiet_hdf5();
  const std::string tmp = path + ".tmp";
  {
    Handle file(H5Fcreate(tmp.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT), H5Fclose);
    if (file.id < 0) fail(ErrorKind::io, tmp, ": cannot create the checkpoint file");
    write_string_attr(file, "format", kFormat, tmp);
    const int version = kCheckpointVersion;
    write_scalar_attr(file, "format_version", H5T_NATIVE_INT, &version, tmp);
    write_scalar_attr(file, "step", H5T_NATIVE_INT64, &meta.step, tmp);
    write_scalar_attr(file, "tokens_seen", H5T_NATIVE_INT64, &meta.tokens_seen, tmp);
    write_scalar_attr(file, "seed", H5T_NATIVE_UINT64, &meta.seed, tmp);
    write_string_attr(file, "config", meta.config_yaml, tmp);
    write_string_attr(file, "tokenizer", meta.tokenizer_json, tmp);
    write_string_attr(file, "muon_momentum_convention", kMomentumConvention, tmp);
    const uint64_t meta_sum = metadata_checksum(checkpoint_metadata(kFormat, version, meta, kMomentumConvention));
    write_scalar_attr(file, "meta_fnv1a64", H5T_NATIVE_UINT64, &meta_sum, tmp);
    for (const auto& [b, s] : layout(table, matrices, kCheckpointVersion))
      write_dataset(file, cat(kBuffers[b], "/", s->name), buffer_of(table, b).data<float>() + s->offset, s->shape, tmp);
    if (!meta.tokenizer_model.empty()) write_u8_dataset(file, "tokenizer_model", meta.tokenizer_model.data(), {meta.tokenizer_model.size()}, tmp);
    check(H5Fflush(file, H5F_SCOPE_GLOBAL), tmp, "flush");
  }
  fsync_path(tmp, O_RDONLY);
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) fail(ErrorKind::io, path, ": cannot move the new checkpoint into place (", ec.message(), ")");
  fsync_path(fs::path(path).parent_path().empty() ? "." : fs::path(path).parent_path().string(), O_RDONLY | O_DIRECTORY);
}

CheckpointMeta load_checkpoint(const std::string& path, ParamTable& table) {
  Handle file(open_checkpoint(path), H5Fclose);
  const CheckpointMeta meta = read_meta(file, path);
  // Everything is read and checked into scratch buffers first: a bad file changes nothing. State
  // a version-3 file does not keep is zero, as it is in a run (that optimizer never touched it).
  const OptimizerConfig::Matrices matrices = meta.format_version >= 3 ? checkpoint_config(meta, path).optim.matrices : OptimizerConfig::Matrices::muon;
  std::vector<std::vector<float>> staged(4, std::vector<float>(size_t(table.numel()), 0.0f));
  for (const auto& [b, s] : layout(table, matrices, meta.format_version))
    read_dataset(file, cat(kBuffers[b], "/", s->name), s->shape, staged[b].data() + s->offset, path);
  for (int b = 0; b < 4; ++b) std::memcpy(buffer_of(table, b).raw(), staged[b].data(), staged[b].size() * sizeof(float));
  return meta;
}

namespace {
// Every f32 dataset of the buffer groups, read once: `visit(dataset, values)` with the checksum
// already compared.
template <class Visit>
void for_each_dataset(hid_t file, const std::string& path, const Visit& visit) {
  for (const char* group : kBuffers) {
    if (H5Lexists(file, group, H5P_DEFAULT) <= 0) continue;
    Handle g(H5Gopen2(file, group, H5P_DEFAULT), H5Gclose);
    H5G_info_t info{};
    H5Gget_info(g, &info);
    for (hsize_t i = 0; i < info.nlinks; ++i) {
      const std::string name = link_name(g, i);
      CheckpointDataset d;
      d.name = cat(group, "/", name);
      Handle ds(H5Dopen2(g, name.c_str(), H5P_DEFAULT), H5Dclose);
      d.shape = dataset_shape(ds);
      int64_t n = 1;
      for (int64_t e : d.shape) n *= e;
      std::vector<float> values(static_cast<size_t>(n));
      d.checksum = has_attr(ds, "fnv1a64") ? read_scalar_attr<uint64_t>(ds, "fnv1a64", H5T_NATIVE_UINT64, path) : 0;
      d.checksum_ok = H5Dread(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, values.data()) >= 0 &&
                      fnv1a64(values.data(), values.size() * sizeof(float)) == d.checksum;
      visit(std::move(d), std::move(values));
    }
  }
}
}  // namespace

CheckpointMeta inspect_checkpoint(const std::string& path, std::vector<CheckpointDataset>* datasets) {
  Handle file(open_checkpoint(path), H5Fclose);
  const CheckpointMeta meta = read_meta(file, path);
  if (datasets) for_each_dataset(file, path, [&](CheckpointDataset&& d, std::vector<float>&&) { datasets->push_back(std::move(d)); });
  return meta;
}

TrainConfig checkpoint_config(const CheckpointMeta& meta, const std::string& path) {
  TrainConfig config;
  try {
    config = parse_train_config(meta.config_yaml, path + " (its config)");
  } catch (const Error& e) {
    fail(ErrorKind::corrupt_data, path, ": its config does not parse (", e.what(), ")");
  }
  nlohmann::json tokenizer;
  try {
    tokenizer = nlohmann::json::parse(meta.tokenizer_json);
  } catch (const nlohmann::json::exception& e) {
    fail(ErrorKind::corrupt_data, path, ": its tokenizer attribute is not JSON (", e.what(), ")");
  }
  const auto vocab = tokenizer.is_object() ? tokenizer.find("vocab_size") : tokenizer.end();
  if (vocab == tokenizer.end() || !vocab->is_number_integer() || vocab->get<int64_t>() < 1 || vocab->get<int64_t>() > ModelConfig::kMaxVocab)
    fail(ErrorKind::corrupt_data, path, ": its tokenizer attribute has no vocab_size in [1, ", ModelConfig::kMaxVocab, "]: ", shortened(meta.tokenizer_json, 80));
  config.model.vocab_size = vocab->get<int64_t>();  // BPE may have settled on fewer tokens than data.vocab_size
  return config;
}

std::vector<std::string> checkpoint_layout_problems(const TrainConfig& config, const std::vector<CheckpointDataset>& datasets, int version) {
  ParamTable table;  // declared, never allocated
  Model::declare_parameters(config.model, table);
  std::map<std::string, const CheckpointDataset*> found;
  for (const auto& d : datasets) found[d.name] = &d;
  std::vector<std::string> problems;
  for (const auto& [b, s] : layout(table, config.optim.matrices, version)) {
    const std::string name = cat(kBuffers[b], "/", s->name);
    auto it = found.find(name);
    if (it == found.end()) problems.push_back(cat("dataset ", name, " is missing"));
    else if (it->second->shape != s->shape)
      problems.push_back(cat("dataset ", name, " has shape ", shape_str(it->second->shape), ", the model needs ", shape_str(s->shape)));
    if (it != found.end()) found.erase(it);
  }
  for (const auto& [name, d] : found) problems.push_back(cat("dataset ", name, " is not part of the config's model"));
  for (const auto& d : datasets)
    if (!d.checksum_ok) problems.push_back(cat("dataset ", d.name, " fails its checksum (the file is damaged)"));
  return problems;
}

namespace {
// The layout check as an Error naming the first problem and how many more there are.
void check_layout(const TrainConfig& config, const std::vector<CheckpointDataset>& datasets, int version, const std::string& path) {
  const std::vector<std::string> problems = checkpoint_layout_problems(config, datasets, version);
  if (!problems.empty()) fail(ErrorKind::corrupt_data, path, ": ", problems.front(), problems.size() > 1 ? cat(" (and ", problems.size() - 1, " more problems)") : "");
}

// The tokenizer a file carries, which must have as many tokens as its tokenizer attribute says.
std::unique_ptr<Tokenizer> checked_tokenizer(const CheckpointMeta& meta, const TrainConfig& config, const std::string& path) {
  std::unique_ptr<Tokenizer> tokenizer = tokenizer_of(meta, path);
  if (tokenizer->vocab_size() != config.model.vocab_size)
    fail(ErrorKind::corrupt_data, path, ": its tokenizer has ", tokenizer->vocab_size(), " tokens but its tokenizer attribute says ", config.model.vocab_size);
  return tokenizer;
}
}  // namespace

CheckpointMeta verify_checkpoint(const std::string& path) {
  std::vector<CheckpointDataset> datasets;
  const CheckpointMeta meta = inspect_checkpoint(path, &datasets);
  check_layout(checkpoint_config(meta, path), datasets, meta.format_version, path);
  return meta;
}

int64_t export_for_inference(Dispatcher& d, const std::string& checkpoint, const std::string& out_path) {
  CheckpointMeta meta;
  const std::vector<NamedArray> arrays = read_checkpoint_arrays(checkpoint, &meta);
  const TrainConfig cfg = checkpoint_config(meta, checkpoint);
  const bool ternary = cfg.model.quant == ModelConfig::Quant::ternary;
  quiet_hdf5();
  const std::string tmp = out_path + ".tmp";
  int64_t weight_bytes = 0;
  {
    Handle file(H5Fcreate(tmp.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT), H5Fclose);
    if (file.id < 0) fail(ErrorKind::io, tmp, ": cannot create the export file");
    write_string_attr(file, "format", kInferenceExportFormat, tmp);
    const int version = kInferenceExportVersion;
    write_scalar_attr(file, "format_version", H5T_NATIVE_INT, &version, tmp);
    write_scalar_attr(file, "step", H5T_NATIVE_INT64, &meta.step, tmp);
    write_string_attr(file, "config", meta.config_yaml, tmp);
    write_string_attr(file, "tokenizer", meta.tokenizer_json, tmp);
    const uint64_t meta_sum = metadata_checksum(export_metadata(kInferenceExportFormat, version, meta));
    write_scalar_attr(file, "meta_fnv1a64", H5T_NATIVE_UINT64, &meta_sum, tmp);
    if (!meta.tokenizer_model.empty()) write_u8_dataset(file, "tokenizer_model", meta.tokenizer_model.data(), {meta.tokenizer_model.size()}, tmp);
    for (const auto& a : arrays) {
      if (a.name.rfind("params/", 0) != 0) continue;  // optimizer state stays behind
      const std::string name = a.name.substr(7);
      const bool bitlinear = ternary && name.rfind("blocks.", 0) == 0 && a.shape.size() == 2;
      if (!bitlinear) {
        write_dataset(file, name, a.values.data(), a.shape, tmp);
        weight_bytes += int64_t(a.values.size() * sizeof(float));
        continue;
      }
      Tensor w = Tensor::wrap(const_cast<float*>(a.values.data()), a.shape, DType::f32, nullptr);
      Tensor q = Tensor::empty(a.shape, DType::i8);
      const float scale = d.quantize_ternary(w, q);
      const int64_t rows = a.shape[0], cols = a.shape[1], packed_cols = (cols + 3) / 4;
      Tensor packed = Tensor::empty({rows, packed_cols}, DType::ternary2);
      d.pack_ternary(q, packed);
      const Handle ds = write_u8_dataset(file, name + ".packed", packed.raw(), {hsize_t(rows), hsize_t(packed_cols)}, tmp);
      write_scalar_attr(ds, "scale", H5T_NATIVE_FLOAT, &scale, tmp);
      write_scalar_attr(ds, "cols", H5T_NATIVE_INT64, &cols, tmp);
      const uint64_t attrs_sum = packed_attrs_checksum(scale, cols);
      write_scalar_attr(ds, "attrs_fnv1a64", H5T_NATIVE_UINT64, &attrs_sum, tmp);
      weight_bytes += int64_t(packed.nbytes()) + int64_t(sizeof(float));
    }
    check(H5Fflush(file, H5F_SCOPE_GLOBAL), tmp, "flush");
  }
  fsync_path(tmp, O_RDONLY);
  std::error_code ec;
  fs::rename(tmp, out_path, ec);
  if (ec) fail(ErrorKind::io, out_path, ": cannot move the export into place (", ec.message(), ")");
  return weight_bytes;
}

std::vector<NamedArray> read_checkpoint_arrays(const std::string& path, CheckpointMeta* meta) {
  Handle file(open_checkpoint(path), H5Fclose);
  const CheckpointMeta m = read_meta(file, path);
  if (meta) *meta = m;
  std::vector<NamedArray> out;
  std::vector<CheckpointDataset> found;
  for_each_dataset(file, path, [&](CheckpointDataset&& d, std::vector<float>&& values) {
    if (!d.checksum_ok) fail(ErrorKind::corrupt_data, path, ": dataset ", d.name, " fails its checksum (the file is damaged)");
    out.push_back({d.name, d.shape, std::move(values)});
    found.push_back(std::move(d));
  });
  // A file whose index lost its datasets reads as "no datasets", not as an error: compare with the config.
  check_layout(checkpoint_config(m, path), found, m.format_version, path);
  return out;
}

std::string checkpoint_format(const std::string& path) {
  Handle file(open_checkpoint(path), H5Fclose);
  const std::string format = has_attr(file, "format") ? read_string_attr(file, "format", path) : "";
  if (format != kTrainingCheckpointFormat && format != kInferenceExportFormat)
    fail(ErrorKind::corrupt_data, path, ": not a hybrit checkpoint or export (attribute format is '", format, "', expected '", kTrainingCheckpointFormat,
         "' or '", kInferenceExportFormat, "')");
  return format;
}

InferenceExport read_inference_export(const std::string& path) {
  Handle file(open_checkpoint(path), H5Fclose);
  if (!has_attr(file, "format") || read_string_attr(file, "format", path) != kInferenceExportFormat)
    fail(ErrorKind::corrupt_data, path, ": not a hybrit export (attribute format is not '", kInferenceExportFormat, "')");
  const int version = read_scalar_attr<int>(file, "format_version", H5T_NATIVE_INT, path);
  if (version != 1 && version != kInferenceExportVersion)
    fail(ErrorKind::unsupported, path, ": export format version ", version, ", this hybrit reads versions 1 and ", kInferenceExportVersion);
  InferenceExport out;
  out.meta.step = read_scalar_attr<int64_t>(file, "step", H5T_NATIVE_INT64, path);
  out.meta.config_yaml = read_string_attr(file, "config", path);
  out.meta.tokenizer_json = read_string_attr(file, "tokenizer", path);
  if (version >= 2) check_metadata(file, export_metadata(kInferenceExportFormat, version, out.meta), path);
  H5G_info_t info{};
  H5Gget_info(file, &info);
  for (hsize_t i = 0; i < info.nlinks; ++i) {
    const std::string name = link_name(file, i);
    Handle ds(H5Dopen2(file, name.c_str(), H5P_DEFAULT), H5Dclose);
    if (ds.id < 0) fail(ErrorKind::corrupt_data, path, ": ", name, " is not a dataset");
    const Shape shape = dataset_shape(ds);
    if (name == "tokenizer_model") {
      const std::vector<uint8_t> bytes = read_u8_dataset(ds, name, path, false);
      out.meta.tokenizer_model.assign(bytes.begin(), bytes.end());
    } else if (name.size() > 7 && name.compare(name.size() - 7, 7, ".packed") == 0) {
      InferenceExport::Packed p;
      p.scale = read_scalar_attr<float>(ds, "scale", H5T_NATIVE_FLOAT, path);
      p.cols = read_scalar_attr<int64_t>(ds, "cols", H5T_NATIVE_INT64, path);
      if (version >= 2 && packed_attrs_checksum(p.scale, p.cols) != read_scalar_attr<uint64_t>(ds, "attrs_fnv1a64", H5T_NATIVE_UINT64, path))
        fail(ErrorKind::corrupt_data, path, ": dataset ", name, ": its scale and column count fail their checksum (the file is damaged)");
      if (shape.size() != 2 || p.cols < 1 || shape[1] != (p.cols + 3) / 4)
        fail(ErrorKind::corrupt_data, path, ": dataset ", name, " has shape ", shape_str(shape), ", which cannot hold ", p.cols, " columns at 4 per byte");
      p.rows = shape[0];
      p.codes = read_u8_dataset(ds, name, path, true);
      out.packed[name.substr(0, name.size() - 7)] = std::move(p);
    } else {
      int64_t n = 1;
      for (int64_t e : shape) n *= e;
      NamedArray a{name, shape, std::vector<float>(size_t(n))};
      read_dataset(file, name, shape, a.values.data(), path);
      out.f32[name] = std::move(a);
    }
  }
  out.config = checkpoint_config(out.meta, path);
  out.tokenizer = checked_tokenizer(out.meta, out.config, path);
  return out;
}

CheckpointModel load_checkpoint_model(Dispatcher& dispatcher, const std::string& path) {
  CheckpointModel out;
  const std::vector<NamedArray> arrays = read_checkpoint_arrays(path, &out.meta);
  out.config = checkpoint_config(out.meta, path);
  out.tokenizer = checked_tokenizer(out.meta, out.config, path);
  out.model = std::make_unique<Model>(out.config.model, dispatcher, out.config.seed);
  ParamTable& table = out.model->params();
  std::map<std::string, const NamedArray*> by_name;
  for (const auto& a : arrays) by_name[a.name] = &a;
  for (const ParamSlice& s : table.slices()) {
    auto it = by_name.find("params/" + s.name);
    if (it == by_name.end()) fail(ErrorKind::corrupt_data, path, ": parameter ", s.name, " is missing");
    if (it->second->shape != s.shape)
      fail(ErrorKind::corrupt_data, path, ": parameter ", s.name, " has shape ", shape_str(it->second->shape), ", the config needs ", shape_str(s.shape));
    std::memcpy(table.param(s).data<float>(), it->second->values.data(), size_t(s.numel) * sizeof(float));
  }
  return out;
}

}  // namespace hybrit
