#include "inference/gguf.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>

#include "core/file.hpp"
#include "core/names.hpp"
#include "model/checkpoint.hpp"

namespace fs = std::filesystem;

namespace hybrit {

const char* to_string(GgufTensorType type) {
  switch (type) {
    case GgufTensorType::f32: return "F32";
    case GgufTensorType::f16: return "F16";
    case GgufTensorType::tq1_0: return "TQ1_0";
    case GgufTensorType::tq2_0: return "TQ2_0";
  }
  return "?";
}

uint16_t float_to_half(float value) {
  uint32_t x;
  std::memcpy(&x, &value, sizeof x);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t abs = x & 0x7fffffffu;
  if (abs >= 0x7f800000u) return uint16_t(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u));  // inf, NaN
  if (abs >= 0x477ff000u) return uint16_t(sign | 0x7c00u);                                        // rounds past 65504
  if (abs < 0x38800000u) {  // a half subnormal (or zero): value / 2^-24, rounded to nearest even
    const float scaled = std::fabs(value) * 16777216.0f;
    return uint16_t(sign | uint32_t(std::nearbyint(scaled)));
  }
  // Normal: rebias the exponent, round the 13 dropped mantissa bits to nearest even.
  const uint32_t mantissa_round = ((abs >> 13) & 1u) + 0xfffu;
  return uint16_t(sign | ((abs - 0x38000000u + mantissa_round) >> 13));
}

std::vector<uint8_t> tq2_0_row(const int8_t* codes, int64_t n) {
  if (n % 256) fail(ErrorKind::invalid_argument, "tq2_0: a row of ", n, " values is not a whole number of 256-value blocks");
  std::vector<uint8_t> out;
  out.reserve(size_t(n / 256 * 66));
  for (int64_t b = 0; b < n; b += 256) {
    const int8_t* x = codes + b;
    int amax = 0;
    for (int j = 0; j < 256; ++j) amax = std::max(amax, std::abs(int(x[j])));
    // qs[64]: two chunks of 128 values; byte m of a chunk holds values m, m + 32, m + 64, m + 96 at
    // bits 0, 2, 4, 6, each as code + 1.
    for (int chunk = 0; chunk < 2; ++chunk, x += 128)
      for (int m = 0; m < 32; ++m) {
        uint8_t q = 0;
        for (int k = 0; k < 4; ++k) q = uint8_t(q + (((x[m + k * 32] * amax) + 1) << (2 * k)));
        out.push_back(q);
      }
    const uint16_t d = float_to_half(float(amax));
    out.push_back(uint8_t(d & 0xff)), out.push_back(uint8_t(d >> 8));
  }
  return out;
}

std::vector<uint8_t> tq1_0_row(const int8_t* codes, int64_t n) {
  if (n % 256) fail(ErrorKind::invalid_argument, "tq1_0: a row of ", n, " values is not a whole number of 256-value blocks");
  std::vector<uint8_t> out;
  out.reserve(size_t(n / 256 * 54));
  // Five trits in a byte as a fixed-point fraction of 3^5: ceil(value * 256 / 243).
  auto pack = [](int value) { return uint8_t((uint16_t(value) * 256 + 242) / 243); };
  for (int64_t b = 0; b < n; b += 256) {
    const int8_t* x = codes + b;
    int amax = 0;
    for (int j = 0; j < 256; ++j) amax = std::max(amax, std::abs(int(x[j])));
    auto trit = [&](int i) { return x[i] * amax + 1; };  // -1, 0, 1 -> 0, 1, 2 (all 1 when the block is zero)
    // qs[48]: 32 bytes of 5 values (m + k * 32 of the first 160), then 16 bytes (m + k * 16 of the next 80).
    for (int m = 0; m < 32; ++m) {
      int q = 0;
      for (int k = 0; k < 5; ++k) q = q * 3 + trit(m + k * 32);
      out.push_back(pack(q));
    }
    for (int m = 0; m < 16; ++m) {
      int q = 0;
      for (int k = 0; k < 5; ++k) q = q * 3 + trit(160 + m + k * 16);
      out.push_back(pack(q));
    }
    // qh[4]: the last 16 values, 4 a byte (j + k * 4), shifted to the most significant trits.
    for (int j = 0; j < 4; ++j) {
      int q = 0;
      for (int k = 0; k < 4; ++k) q = q * 3 + trit(240 + j + k * 4);
      out.push_back(pack(q * 3));
    }
    const uint16_t d = float_to_half(float(amax));
    out.push_back(uint8_t(d & 0xff)), out.push_back(uint8_t(d >> 8));
  }
  return out;
}

std::string gpt2_byte_token(uint8_t b) {
  // Printable bytes stand for themselves; the others (controls, space, 127-160, 173) take the code
  // points from 256 on, in byte order.
  auto printable = [](int c) { return (c >= '!' && c <= '~') || (c >= 0xA1 && c <= 0xAC) || (c >= 0xAE && c <= 0xFF); };
  int cp = b;
  if (!printable(b)) {
    cp = 256;
    for (int c = 0; c < b; ++c) cp += !printable(c);
  }
  std::string s;
  if (cp < 0x80) {
    s += char(cp);
  } else {
    s += char(0xC0 | (cp >> 6));
    s += char(0x80 | (cp & 0x3F));
  }
  return s;
}

namespace {

// GGUF's metadata value types (gguf.h enum gguf_type).
enum : uint32_t { kU8 = 0, kU32 = 4, kI32 = 5, kF32 = 6, kBool = 7, kString = 8, kArray = 9 };
constexpr uint64_t kAlignment = 32;  // general.alignment's default

class GgufWriter {
 public:
  void u32(uint32_t v) { raw(&v, 4); }
  void u64(uint64_t v) { raw(&v, 8); }
  void str(const std::string& s) {
    u64(s.size());
    head_ += s;
  }
  void kv(const std::string& key, uint32_t type) {
    str(key);
    u32(type);
    ++kv_count_;
  }
  void kv_u32(const std::string& key, uint32_t v) { kv(key, kU32), u32(v); }
  void kv_f32(const std::string& key, float v) { kv(key, kF32), raw(&v, 4); }
  void kv_bool(const std::string& key, bool v) {
    kv(key, kBool);
    head_ += char(v ? 1 : 0);
  }
  void kv_str(const std::string& key, const std::string& v) { kv(key, kString), str(v); }
  void kv_strings(const std::string& key, const std::vector<std::string>& v) {
    kv(key, kArray), u32(kString), u64(v.size());
    for (const auto& s : v) str(s);
  }
  void kv_f32s(const std::string& key, const std::vector<float>& v) {
    kv(key, kArray), u32(kF32), u64(v.size());
    raw(v.data(), v.size() * 4);
  }
  void kv_u8s(const std::string& key, const std::string& v) {
    kv(key, kArray), u32(kU8), u64(v.size());
    raw(v.data(), v.size());
  }
  void kv_i32s(const std::string& key, const std::vector<int32_t>& v) {
    kv(key, kArray), u32(kI32), u64(v.size());
    raw(v.data(), v.size() * 4);
  }

  // A tensor: ne[0] is the innermost (row length), as ggml counts.
  void tensor(const std::string& name, std::vector<int64_t> ne, GgufTensorType type, std::vector<uint8_t> bytes) {
    infos_.push_back({name, std::move(ne), type, data_.size()});
    data_.insert(data_.end(), bytes.begin(), bytes.end());
    while (data_.size() % kAlignment) data_.push_back(0);
  }

  std::string finish() {
    std::string out = "GGUF";
    auto put = [&](const void* p, size_t n) { out.append(static_cast<const char*>(p), n); };
    const uint32_t version = 3;
    const uint64_t tensors = infos_.size();
    put(&version, 4), put(&tensors, 8), put(&kv_count_, 8);
    out += head_;
    for (const auto& t : infos_) {
      const uint64_t len = t.name.size(), dims = t.ne.size();
      put(&len, 8), out += t.name;
      const uint32_t nd = uint32_t(dims);
      put(&nd, 4);
      for (int64_t e : t.ne) put(&e, 8);
      const uint32_t type = uint32_t(t.type);
      put(&type, 4), put(&t.offset, 8);
    }
    while (out.size() % kAlignment) out += char(0);
    out.append(reinterpret_cast<const char*>(data_.data()), data_.size());
    return out;
  }
  size_t tensor_count() const { return infos_.size(); }

 private:
  void raw(const void* p, size_t n) { head_.append(static_cast<const char*>(p), n); }
  struct Info {
    std::string name;
    std::vector<int64_t> ne;
    GgufTensorType type;
    uint64_t offset;
  };
  std::string head_;
  uint64_t kv_count_ = 0;
  std::vector<Info> infos_;
  std::vector<uint8_t> data_;
};

// The tokenizer as llama.cpp's vocabulary.
//   byte: a byte-level BPE vocabulary ("gpt2") without merges: token b is byte b (in GPT-2's
//     printable form), token 256 the end of a record, used as EOS; no BOS (hybrit starts a prompt
//     with its first byte).
//   bpe: the sentencepiece model as an SPM vocabulary ("llama"): pieces, scores and kinds in id
//     order (byte-fallback pieces as byte tokens), unk 0, the end of a record (id 1) as EOS, no BOS,
//     no space prefix (hybrit trains without the dummy prefix); the model's bytes travel too, as
//     hybrit.tokenizer_model, so hybrit reads the file back with the same tokenizer.
void write_tokenizer(GgufWriter& g, const std::string& kind, const std::string& model_bytes, const std::string& checkpoint) {
  std::vector<std::string> tokens;
  std::vector<int32_t> types;  // llama.cpp's: 1 normal, 2 unknown, 3 control, 6 byte
  if (kind == "byte") {
    for (int b = 0; b < 256; ++b) tokens.push_back(gpt2_byte_token(uint8_t(b))), types.push_back(1);
    tokens.push_back("<|endoftext|>"), types.push_back(3);
    g.kv_str("tokenizer.ggml.model", "gpt2");
    g.kv_str("tokenizer.ggml.pre", "default");
    g.kv_strings("tokenizer.ggml.tokens", tokens);
    g.kv_i32s("tokenizer.ggml.token_type", types);
    g.kv_strings("tokenizer.ggml.merges", {});
    g.kv_u32("tokenizer.ggml.eos_token_id", 256);
    g.kv_u32("tokenizer.ggml.bos_token_id", 256);
  } else {
    std::vector<float> scores;
    for (const TokenizerPiece& p : bpe_pieces(model_bytes, checkpoint)) {
      tokens.push_back(p.text), scores.push_back(p.score);
      types.push_back(p.kind == TokenizerPiece::Kind::unknown ? 2 : p.kind == TokenizerPiece::Kind::control ? 3 : p.kind == TokenizerPiece::Kind::byte ? 6 : 1);
    }
    g.kv_str("tokenizer.ggml.model", "llama");
    g.kv_strings("tokenizer.ggml.tokens", tokens);
    g.kv_f32s("tokenizer.ggml.scores", scores);
    g.kv_i32s("tokenizer.ggml.token_type", types);
    g.kv_u32("tokenizer.ggml.unknown_token_id", 0);
    g.kv_u32("tokenizer.ggml.eos_token_id", 1);
    g.kv_u32("tokenizer.ggml.bos_token_id", 1);
    g.kv_bool("tokenizer.ggml.add_space_prefix", false);
    g.kv_u8s("hybrit.tokenizer_model", model_bytes);
  }
  g.kv_bool("tokenizer.ggml.add_bos_token", false);
  g.kv_bool("tokenizer.ggml.add_eos_token", false);
}

std::vector<uint8_t> f32_bytes(const float* v, int64_t n) {
  std::vector<uint8_t> out(size_t(n) * 4);
  std::memcpy(out.data(), v, out.size());
  return out;
}

std::vector<uint8_t> f16_bytes(const float* v, int64_t n) {
  std::vector<uint8_t> out(size_t(n) * 2);
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t h = float_to_half(v[i]);
    out[size_t(2 * i)] = uint8_t(h & 0xff), out[size_t(2 * i + 1)] = uint8_t(h >> 8);
  }
  return out;
}

// A hybrit parameter's GGUF name (llama.cpp's bitnet tensors), without the ".weight" / ".scale"
// suffix: tok_emb -> token_embd, final_norm -> output_norm, blocks.L.wq -> blk.L.attn_q, ...
// Both directions walk Model::declare_parameters' slices through it, so the names and shapes
// live in one place each.
std::string gguf_base_name(const std::string& hybrit_name) {
  static const std::map<std::string, std::string> kBlock = {
      {"attn_norm", "attn_norm"}, {"attn_sub_norm", "attn_sub_norm"}, {"ffn_norm", "ffn_norm"}, {"ffn_sub_norm", "ffn_sub_norm"},
      {"wq", "attn_q"},           {"wk", "attn_k"},                   {"wv", "attn_v"},         {"wo", "attn_output"},
      {"w_gate", "ffn_gate"},     {"w_up", "ffn_up"},                 {"w_down", "ffn_down"}};
  if (hybrit_name == "tok_emb") return "token_embd";
  if (hybrit_name == "final_norm") return "output_norm";
  const size_t dot = hybrit_name.find('.', 7);  // "blocks.L.piece"
  if (hybrit_name.rfind("blocks.", 0) == 0 && dot != std::string::npos)
    if (const auto it = kBlock.find(hybrit_name.substr(dot + 1)); it != kBlock.end()) return "blk." + hybrit_name.substr(7, dot - 7) + "." + it->second;
  fail(ErrorKind::unsupported, "GGUF: no bitnet tensor for hybrit's parameter ", hybrit_name);
}

// The parameters a model of this config has, in order (declared, not allocated).
ParamTable declared_parameters(const ModelConfig& m) {
  ParamTable table;
  Model::declare_parameters(m, table);
  return table;
}

// A model's weights by hybrit name: f32 values, and for BitLinear weights their ternary codes and scale.
struct Weights {
  TrainConfig config;
  CheckpointMeta meta;
  std::map<std::string, NamedArray> f32;
  struct Ternary {
    int64_t rows = 0, cols = 0;
    float scale = 1;
    std::vector<int8_t> codes;
  };
  std::map<std::string, Ternary> ternary;
};

Weights read_weights(Dispatcher& d, const std::string& path) {
  Weights w;
  if (checkpoint_format(path) == kInferenceExportFormat) {
    InferenceExport ex = read_inference_export(path);
    w.config = ex.config, w.meta = ex.meta, w.f32 = std::move(ex.f32);
    for (auto& [name, p] : ex.packed) {
      Weights::Ternary t{p.rows, p.cols, p.scale, std::vector<int8_t>(size_t(p.rows * p.cols))};
      Tensor packed = Tensor::wrap(p.codes.data(), {p.rows, (p.cols + 3) / 4}, DType::ternary2, nullptr);
      Tensor q = Tensor::wrap(t.codes.data(), {p.rows, p.cols}, DType::i8, nullptr);
      d.unpack_ternary(packed, q);
      w.ternary[name] = std::move(t);
    }
    return w;
  }
  const std::vector<NamedArray> arrays = read_checkpoint_arrays(path, &w.meta);
  w.config = checkpoint_config(w.meta, path);
  const bool ternary = w.config.model.quant == ModelConfig::Quant::ternary;
  for (const auto& a : arrays) {
    if (a.name.rfind("params/", 0) != 0) continue;  // optimizer state stays behind
    const std::string name = a.name.substr(7);
    if (ternary && name.rfind("blocks.", 0) == 0 && a.shape.size() == 2) {
      // The codes and scale hybrit's own export and inference use (the same quantizer).
      Weights::Ternary t{a.shape[0], a.shape[1], 1, std::vector<int8_t>(size_t(a.shape[0] * a.shape[1]))};
      Tensor wt = Tensor::wrap(const_cast<float*>(a.values.data()), a.shape, DType::f32, nullptr);
      Tensor q = Tensor::wrap(t.codes.data(), a.shape, DType::i8, nullptr);
      t.scale = d.quantize_ternary(wt, q);
      w.ternary[name] = std::move(t);
    } else {
      w.f32[name] = a;
    }
  }
  return w;
}

}  // namespace

bool export_as_gguf(const std::string& format, const std::string& out_path) {
  if (format == "gguf") return true;
  if (format == "hyb") return false;
  if (format != "auto") fail(ErrorKind::invalid_argument, "format: expected auto, hyb or gguf, got '", shortened(format), "'");
  return fs::path(out_path).extension() == ".gguf";
}

GgufExportReport export_gguf(Dispatcher& d, const std::string& checkpoint, const std::string& out_path, const GgufExportOptions& o) {
  static const std::vector<std::string> kTypes = {"tq2_0", "tq1_0", "f16", "f32"};
  if (std::find(kTypes.begin(), kTypes.end(), o.type) == kTypes.end())
    fail(ErrorKind::invalid_argument, "--type: expected tq2_0, tq1_0, f16 or f32, got '", o.type, "'");
  Weights w = read_weights(d, checkpoint);
  const ModelConfig& m = w.config.model;
  // llama.cpp's bitnet graph: SubLN, SwiGLU, the embedding as the head. It has no graph for the
  // others (no SubLN with an untied head, no relu^2), so those are refused before anything is written.
  std::vector<std::string> need;
  if (!m.subln) need.push_back("model.subln: true");
  if (m.ffn != ModelConfig::Ffn::swiglu) need.push_back("model.ffn: swiglu");
  if (!m.tied_embeddings) need.push_back("model.tied_embeddings: true");
  if (!need.empty()) {
    std::string list;
    for (const auto& n : need) list += (list.empty() ? "" : ", ") + n;
    fail(ErrorKind::unsupported, checkpoint, ": llama.cpp's bitnet graph (the one GGUF architecture that runs hybrit's BitLinear models) needs ", list,
         "; train with those to export GGUF (hybrit checkpoint export -o MODEL.hyb still works)");
  }
  const bool ternary = m.quant == ModelConfig::Quant::ternary;
  if (!ternary && (o.type == "tq2_0" || o.type == "tq1_0"))
    fail(ErrorKind::invalid_argument, "--type ", o.type, ": ", checkpoint, " is a full-precision model (model.quant: none), it has no ternary codes; use --type f16 or f32");

  GgufExportReport report;
  report.architecture = "bitnet";
  std::map<int64_t, int> f16_fallbacks;  // row length -> BitLinear weights written as F16 for it
  GgufWriter g;
  const std::string arch = "bitnet";
  g.kv_str("general.architecture", arch);
  g.kv_str("general.name", o.name.empty() ? fs::path(checkpoint).stem().string() : o.name);
  g.kv_u32(arch + ".vocab_size", uint32_t(m.vocab_size));
  g.kv_u32(arch + ".context_length", uint32_t(m.context));
  g.kv_u32(arch + ".embedding_length", uint32_t(m.dim));
  g.kv_u32(arch + ".block_count", uint32_t(m.n_layers));
  g.kv_u32(arch + ".feed_forward_length", uint32_t(m.hidden()));
  g.kv_u32(arch + ".attention.head_count", uint32_t(m.n_heads));
  g.kv_u32(arch + ".attention.head_count_kv", uint32_t(m.kv_heads()));
  g.kv_u32(arch + ".rope.dimension_count", uint32_t(m.head_dim()));
  g.kv_f32(arch + ".rope.freq_base", float(m.rope_theta));
  g.kv_f32(arch + ".attention.layer_norm_rms_epsilon", float(m.norm_eps));
  write_tokenizer(g, w.config.data.tokenizer, w.meta.tokenizer_model, checkpoint);
  g.kv_str("hybrit.training_config", w.meta.config_yaml);
  g.kv_u32("hybrit.step", uint32_t(std::min<int64_t>(w.meta.step, UINT32_MAX)));

  auto f32_tensor = [&](const std::string& hybrit_name, const std::string& gguf_name) {
    const auto it = w.f32.find(hybrit_name);
    if (it == w.f32.end()) fail(ErrorKind::corrupt_data, checkpoint, ": parameter ", hybrit_name, " is missing");
    const NamedArray& a = it->second;
    std::vector<int64_t> ne(a.shape.rbegin(), a.shape.rend());
    g.tensor(gguf_name, ne, GgufTensorType::f32, f32_bytes(a.values.data(), int64_t(a.values.size())));
  };
  auto linear = [&](const std::string& hybrit_name, const std::string& gguf_name) {
    if (!ternary) {
      const auto it = w.f32.find(hybrit_name);
      if (it == w.f32.end()) fail(ErrorKind::corrupt_data, checkpoint, ": parameter ", hybrit_name, " is missing");
      const NamedArray& a = it->second;
      const std::vector<int64_t> ne = {a.shape[1], a.shape[0]};
      if (o.type == "f32") g.tensor(gguf_name + ".weight", ne, GgufTensorType::f32, f32_bytes(a.values.data(), int64_t(a.values.size())));
      else g.tensor(gguf_name + ".weight", ne, GgufTensorType::f16, f16_bytes(a.values.data(), int64_t(a.values.size())));
      return;
    }
    const auto it = w.ternary.find(hybrit_name);
    if (it == w.ternary.end()) fail(ErrorKind::corrupt_data, checkpoint, ": BitLinear weight ", hybrit_name, " is missing");
    const Weights::Ternary& t = it->second;
    GgufTensorType type = o.type == "tq2_0" ? GgufTensorType::tq2_0 : o.type == "tq1_0" ? GgufTensorType::tq1_0 : o.type == "f16" ? GgufTensorType::f16 : GgufTensorType::f32;
    if ((type == GgufTensorType::tq2_0 || type == GgufTensorType::tq1_0) && t.cols % 256) {
      ++f16_fallbacks[t.cols];
      type = GgufTensorType::f16;
    }
    std::vector<uint8_t> bytes;
    if (type == GgufTensorType::tq2_0 || type == GgufTensorType::tq1_0) {
      for (int64_t r = 0; r < t.rows; ++r) {
        const std::vector<uint8_t> row = type == GgufTensorType::tq2_0 ? tq2_0_row(t.codes.data() + r * t.cols, t.cols) : tq1_0_row(t.codes.data() + r * t.cols, t.cols);
        bytes.insert(bytes.end(), row.begin(), row.end());
      }
    } else {
      std::vector<float> values(t.codes.begin(), t.codes.end());
      bytes = type == GgufTensorType::f16 ? f16_bytes(values.data(), int64_t(values.size())) : f32_bytes(values.data(), int64_t(values.size()));
    }
    g.tensor(gguf_name + ".weight", {t.cols, t.rows}, type, std::move(bytes));
    g.tensor(gguf_name + ".scale", {1}, GgufTensorType::f32, f32_bytes(&t.scale, 1));
  };

  const ParamTable parameters = declared_parameters(m);
  for (const ParamSlice& slice : parameters.slices()) {
    if (slice.group == ParamGroup::block_matrix) linear(slice.name, gguf_base_name(slice.name));
    else f32_tensor(slice.name, gguf_base_name(slice.name) + ".weight");
  }
  for (const auto& [cols, count] : f16_fallbacks)
    report.notes.push_back(cat(count, " BitLinear weights have rows of ", cols, " values, not whole 256-value ", o.type == "tq1_0" ? "TQ1_0" : "TQ2_0",
                               " blocks: written as F16, which holds their ternary codes exactly (", cols == m.dim ? "model.dim" : "model.ffn_hidden",
                               " a multiple of 256 gives TQ blocks)"));
  report.tensors = int64_t(g.tensor_count());
  const std::string bytes = g.finish();
  report.file_bytes = int64_t(bytes.size());
  write_file_atomically(out_path, bytes);
  return report;
}

}  // namespace hybrit

// ---------------------------------------------------------------------------------------------
// Reading a GGUF file back

namespace hybrit {

bool is_gguf_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  char magic[4] = {};
  return in.read(magic, 4) && std::memcmp(magic, "GGUF", 4) == 0;
}

namespace {

// A bounds-checked cursor over the file: every read past the end is one error naming the file.
class GgufReader {
 public:
  GgufReader(std::string bytes, std::string path) : bytes_(std::move(bytes)), path_(std::move(path)) {}
  template <class T>
  T get() {
    T v;
    take(&v, sizeof v);
    return v;
  }
  std::string str() {
    const uint64_t n = get<uint64_t>();
    need(n);
    std::string s = bytes_.substr(at_, size_t(n));
    at_ += size_t(n);
    return s;
  }
  void skip(uint64_t n) { need(n), at_ += size_t(n); }
  size_t at() const { return at_; }
  size_t size() const { return bytes_.size(); }
  const uint8_t* data(size_t offset) const { return reinterpret_cast<const uint8_t*>(bytes_.data()) + offset; }
  [[noreturn]] void bad(const std::string& what) const { fail(ErrorKind::corrupt_data, path_, ": not a GGUF file hybrit can read: ", what); }

 private:
  void need(uint64_t n) const {
    if (n > bytes_.size() - at_) bad(cat("truncated at byte ", at_, " (", n, " more bytes needed)"));
  }
  void take(void* out, size_t n) {
    need(n);
    std::memcpy(out, bytes_.data() + at_, n);
    at_ += n;
  }
  std::string bytes_, path_;
  size_t at_ = 0;
};

struct GgufValue {
  uint32_t type = 0;
  uint64_t u = 0;       // integers and booleans
  double f = 0;         // floats
  std::string s;        // strings
  std::vector<std::string> strings;  // arrays of strings
  std::string u8s;                   // arrays of uint8 (other arrays are skipped)
};

float half_to_float(uint16_t h) {
  const int exponent = (h >> 10) & 31, mantissa = h & 1023;
  const float v = exponent == 0 ? std::ldexp(float(mantissa), -24) : exponent == 31 ? (mantissa ? NAN : INFINITY) : std::ldexp(float(mantissa + 1024), exponent - 25);
  return (h >> 15) ? -v : v;
}
// The half at index i of little-endian bytes.
float half_at(const uint8_t* p, int64_t i) { return half_to_float(uint16_t(p[2 * i] | (p[2 * i + 1] << 8))); }

}  // namespace

InferenceExport read_gguf_model(Dispatcher& d, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(ErrorKind::io, path, ": cannot open");
  GgufReader r(std::string(std::istreambuf_iterator<char>(in), {}), path);
  if (r.size() < 4 || r.get<uint32_t>() != 0x46554747u) r.bad("no GGUF magic");
  const uint32_t version = r.get<uint32_t>();
  if (version != 2 && version != 3) r.bad(cat("version ", version, " (2 and 3 are read)"));
  const uint64_t n_tensors = r.get<uint64_t>(), n_kv = r.get<uint64_t>();
  if (n_tensors > (1u << 20) || n_kv > (1u << 20)) r.bad(cat(n_tensors, " tensors and ", n_kv, " metadata keys"));
  std::map<std::string, GgufValue> kv;
  auto scalar = [&](uint32_t type, GgufValue& v) {
    switch (type) {
      case 0: case 1: case 7: v.u = r.get<uint8_t>(); break;
      case 2: case 3: v.u = r.get<uint16_t>(); break;
      case 4: case 5: v.u = r.get<uint32_t>(); break;
      case 6: v.f = r.get<float>(); break;
      case 10: case 11: v.u = r.get<uint64_t>(); break;
      case 12: v.f = r.get<double>(); break;
      case 8: v.s = r.str(); break;
      default: r.bad(cat("metadata type ", type));
    }
  };
  for (uint64_t i = 0; i < n_kv; ++i) {
    const std::string key = r.str();
    GgufValue v;
    v.type = r.get<uint32_t>();
    if (v.type == kArray) {
      const uint32_t elem = r.get<uint32_t>();
      const uint64_t n = r.get<uint64_t>();
      if (elem == kArray || n > r.size()) r.bad(cat(key, ": an array of ", n, " elements of type ", elem));
      GgufValue e;
      for (uint64_t j = 0; j < n; ++j) {
        scalar(elem, e);
        if (elem == kString) v.strings.push_back(e.s);
        else if (elem == kU8) v.u8s += char(e.u);
      }
    } else {
      scalar(v.type, v);
    }
    kv[key] = std::move(v);
  }
  auto get = [&](const std::string& key) -> const GgufValue& {
    const auto it = kv.find(key);
    if (it == kv.end()) r.bad(cat("metadata ", key, " is missing"));
    return it->second;
  };
  const std::string arch = get("general.architecture").s;
  if (arch != "bitnet") fail(ErrorKind::unsupported, path, ": architecture '", shortened(arch), "': hybrit runs GGUF files of the bitnet architecture");
  // The tokenizer: the byte vocabulary token for token, or the BPE model hybrit exported with it.
  const GgufValue& tokens = get("tokenizer.ggml.tokens");
  const std::string vocab_kind = get("tokenizer.ggml.model").s;
  std::unique_ptr<Tokenizer> tokenizer;
  std::string tokenizer_model;
  bool known = false;
  if (vocab_kind == "gpt2" && tokens.strings.size() == 257) {
    known = true;
    for (int b = 0; known && b < 256; ++b) known = tokens.strings[size_t(b)] == gpt2_byte_token(uint8_t(b));
    if (known) tokenizer = std::make_unique<ByteTokenizer>();
  } else if (vocab_kind == "llama" && kv.count("hybrit.tokenizer_model")) {
    tokenizer_model = kv["hybrit.tokenizer_model"].u8s;
    const std::vector<TokenizerPiece> pieces = bpe_pieces(tokenizer_model, path + " (hybrit.tokenizer_model)");
    known = pieces.size() == tokens.strings.size();
    for (size_t i = 0; known && i < pieces.size(); ++i) known = pieces[i].text == tokens.strings[i];
    if (known) tokenizer = bpe_tokenizer_from_bytes(tokenizer_model, path + " (hybrit.tokenizer_model)");
  }
  if (!known)
    fail(ErrorKind::unsupported, path, ": its tokenizer (", shortened(vocab_kind), ", ", tokens.strings.size(),
         " tokens) is not one hybrit exported (the byte vocabulary, or a BPE model carried as hybrit.tokenizer_model); hybrit runs the GGUF files it exports");

  InferenceExport ex;
  auto u = [&](const std::string& key) { return int64_t(get(arch + "." + key).u); };
  if (kv.count("hybrit.training_config")) {
    ex.config = parse_train_config(kv["hybrit.training_config"].s, path + " (hybrit.training_config)");
    ex.meta.config_yaml = kv["hybrit.training_config"].s;
  } else {
    ex.config.model.subln = ex.config.model.tied_embeddings = true;
    ex.config.model.ffn = ModelConfig::Ffn::swiglu;
  }
  ModelConfig& m = ex.config.model;
  m.vocab_size = tokenizer->vocab_size(), m.dim = u("embedding_length"), m.n_layers = u("block_count"), m.n_heads = u("attention.head_count");
  m.n_kv_heads = u("attention.head_count_kv"), m.ffn_hidden = u("feed_forward_length"), m.context = u("context_length");
  m.rope_theta = get(arch + ".rope.freq_base").f, m.norm_eps = get(arch + ".attention.layer_norm_rms_epsilon").f;
  if (kv.count("hybrit.step")) ex.meta.step = int64_t(kv["hybrit.step"].u);
  if (!(m.rope_theta > 0 && std::isfinite(m.rope_theta))) r.bad(cat(arch, ".rope.freq_base: expected a number > 0, got ", m.rope_theta));
  if (!(m.norm_eps > 0 && m.norm_eps <= 1)) r.bad(cat(arch, ".attention.layer_norm_rms_epsilon: expected a number in (0, 1], got ", m.norm_eps));
  try {
    m.validate();
  } catch (const Error& e) {
    r.bad(e.what());
  }
  ex.config.data.tokenizer = tokenizer_model.empty() ? "byte" : "bpe";
  ex.meta.tokenizer_model = tokenizer_model;
  ex.tokenizer = std::move(tokenizer);

  // Tensor infos, then the data, aligned.
  struct Info {
    std::vector<int64_t> ne;
    uint32_t type;
    uint64_t offset;
  };
  std::map<std::string, Info> infos;
  for (uint64_t i = 0; i < n_tensors; ++i) {
    const std::string name = r.str();
    Info t;
    const uint32_t dims = r.get<uint32_t>();
    if (dims < 1 || dims > 4) r.bad(cat(name, ": ", dims, " dimensions"));
    for (uint32_t j = 0; j < dims; ++j) {
      const int64_t e = int64_t(r.get<uint64_t>());
      if (e < 1 || e > (int64_t(1) << 32)) r.bad(cat(name, ": dimension ", e));
      t.ne.push_back(e);
    }
    t.type = r.get<uint32_t>(), t.offset = r.get<uint64_t>();
    infos[name] = std::move(t);
  }
  const uint64_t alignment = kv.count("general.alignment") ? kv["general.alignment"].u : kAlignment;
  if (alignment == 0 || alignment > 4096) r.bad(cat("general.alignment ", alignment));
  const size_t data_start = size_t((r.at() + alignment - 1) / alignment * alignment);
  // A tensor's bytes, its shape checked against what the config needs (rows, cols; cols innermost).
  auto tensor = [&](const std::string& name, int64_t rows, int64_t cols) {
    const auto it = infos.find(name);
    if (it == infos.end()) r.bad(cat("tensor ", name, " is missing"));
    const Info& t = it->second;
    int64_t numel = 1;
    for (int64_t e : t.ne) {
      if (numel > (int64_t(1) << 40) / e) r.bad(cat("tensor ", name, " has shape ", shape_str(t.ne)));  // no product overflows
      numel *= e;
    }
    if (t.ne[0] != cols || numel != rows * cols) r.bad(cat("tensor ", name, " has shape ", shape_str(t.ne), ", the config needs ", cols, " x ", rows));
    const int64_t bytes = t.type == 0 ? numel * 4 : t.type == 1 ? numel * 2 : t.type == 35 ? numel / 256 * 66 : t.type == 34 ? numel / 256 * 54 : -1;
    if (bytes < 0) fail(ErrorKind::unsupported, path, ": tensor ", name, " has ggml type ", t.type, "; hybrit reads F32, F16, TQ1_0 and TQ2_0");
    if ((t.type == 34 || t.type == 35) && cols % 256) r.bad(cat("tensor ", name, ": TQ rows of ", cols, " values"));
    if (t.offset > r.size() || data_start + t.offset + uint64_t(bytes) > r.size()) r.bad(cat("tensor ", name, " runs past the end of the file"));
    return std::make_pair(&t, r.data(data_start + size_t(t.offset)));
  };
  auto f32 = [&](const std::string& gguf_name, const std::string& name, Shape shape) {
    int64_t rows = 1;
    for (size_t i = 0; i + 1 < shape.size(); ++i) rows *= shape[i];
    const auto [t, p] = tensor(gguf_name, rows, shape.back());
    NamedArray a{name, shape, std::vector<float>(size_t(rows * shape.back()))};
    for (size_t i = 0; i < a.values.size(); ++i) {
      if (t->type == 0) std::memcpy(&a.values[i], p + 4 * i, 4);
      else if (t->type == 1) a.values[i] = half_at(p, int64_t(i));
      else r.bad(cat("tensor ", gguf_name, " must be F32 or F16"));
    }
    ex.f32[name] = std::move(a);
  };
  const bool ternary = infos.count("blk.0.attn_q.scale") > 0;
  m.quant = ternary ? ModelConfig::Quant::ternary : ModelConfig::Quant::none;
  auto linear = [&](const std::string& gguf_name, const std::string& name, int64_t rows, int64_t cols) {
    if (!ternary) return f32(gguf_name + ".weight", name, {rows, cols});
    const auto [t, p] = tensor(gguf_name + ".weight", rows, cols);
    const auto [st, sp] = tensor(gguf_name + ".scale", 1, 1);
    if (st->type != 0) r.bad(cat("tensor ", gguf_name, ".scale must be F32"));
    float scale;
    std::memcpy(&scale, sp, 4);
    // Codes straight from the blocks (no f32 copy of the tensor): a value is code x block scale, and
    // every non-zero value of the tensor must have the same magnitude (one scale, as hybrit writes).
    const int64_t n = rows * cols;
    std::vector<int8_t> codes(static_cast<size_t>(n));
    float common = 0;
    auto check_magnitude = [&](float magnitude) {
      if (common == 0) common = magnitude;
      else if (magnitude != common) r.bad(cat("tensor ", gguf_name, ".weight holds ", magnitude, " and ", common, ": not ternary codes times one scale"));
    };
    if (t->type == 35 || t->type == 34) {
      const int64_t block_bytes = t->type == 35 ? 66 : 54;
      for (int64_t b = 0; b < n / 256; ++b) {
        const uint8_t* q = p + b * block_bytes;
        const float dblock = half_at(q + block_bytes - 2, 0);
        if (!std::isfinite(dblock)) r.bad(cat("tensor ", gguf_name, ".weight has block scale ", dblock));
        int8_t* out = codes.data() + b * 256;
        if (t->type == 35) {
          for (int j = 0; j < 64; j += 32)
            for (int l = 0; l < 4; ++l)
              for (int mm = 0; mm < 32; ++mm) *out++ = int8_t(((q[j + mm] >> (2 * l)) & 3) - 1);
        } else {
          const uint8_t pow3[6] = {1, 3, 9, 27, 81, 243};
          auto trit = [&](uint8_t byte, int k) { return int8_t(((uint16_t(uint8_t(byte * pow3[k])) * 3) >> 8) - 1); };
          for (int k = 0; k < 5; ++k)
            for (int mm = 0; mm < 32; ++mm) *out++ = trit(q[mm], k);
          for (int k = 0; k < 5; ++k)
            for (int mm = 0; mm < 16; ++mm) *out++ = trit(q[32 + mm], k);
          for (int k = 0; k < 4; ++k)
            for (int j = 0; j < 4; ++j) *out++ = trit(q[48 + j], k);
        }
        // Code x block scale: a zero scale zeroes the block, a negative one flips its codes.
        bool any = false;
        for (int8_t* c = out - 256; c != out; ++c) {
          *c = dblock == 0 ? int8_t(0) : dblock < 0 ? int8_t(-*c) : *c;
          any = any || *c != 0;
        }
        if (any) check_magnitude(std::fabs(dblock));
      }
    } else if (t->type == 1 || t->type == 0) {
      for (int64_t i = 0; i < n; ++i) {
        float v;
        if (t->type == 1) v = half_at(p, i);
        else std::memcpy(&v, p + 4 * i, 4);
        if (v != 0) check_magnitude(std::fabs(v));
        codes[size_t(i)] = int8_t(v > 0 ? 1 : v < 0 ? -1 : 0);
      }
    }
    Tensor qt = Tensor::wrap(codes.data(), {rows, cols}, DType::i8, nullptr);
    Tensor packed = Tensor::empty({rows, (cols + 3) / 4}, DType::ternary2);
    d.pack_ternary(qt, packed);
    InferenceExport::Packed pk;
    pk.rows = rows, pk.cols = cols, pk.scale = scale * (common == 0 ? 1.0f : common);
    pk.codes.assign(static_cast<const uint8_t*>(packed.raw()), static_cast<const uint8_t*>(packed.raw()) + packed.nbytes());
    ex.packed[name] = std::move(pk);
  };
  const ParamTable parameters = declared_parameters(m);
  for (const ParamSlice& slice : parameters.slices()) {
    if (slice.group == ParamGroup::block_matrix) linear(gguf_base_name(slice.name), slice.name, slice.shape[0], slice.shape[1]);
    else f32(gguf_base_name(slice.name) + ".weight", slice.name, slice.shape);
  }
  return ex;
}

}  // namespace hybrit
