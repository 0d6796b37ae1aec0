// The GGUF writer without llama.cpp: the TQ blocks decoded by a decoder written from ggml's
// dequantize_row_tq1_0/tq2_0 give back the codes, halves round to nearest, and an exported model
// read back by a small GGUF reader here holds exactly the weights hybrit runs.
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <set>

#include "inference/gguf.hpp"
#include "inference/model.hpp"
#include "test_support.hpp"
#include "model/checkpoint.hpp"
#include "model/config.hpp"
#include "training/trainer.hpp"

namespace hybrit::test {
namespace {

float half_to_float(uint16_t h) {
  const int sign = h >> 15, exponent = (h >> 10) & 31, mantissa = h & 1023;
  float v = exponent == 0 ? std::ldexp(float(mantissa), -24)
            : exponent == 31 ? (mantissa ? NAN : INFINITY)
                             : std::ldexp(float(mantissa + 1024), exponent - 25);
  return sign ? -v : v;
}

// ggml's dequantize_row_tq2_0, restated: per block of 256, 2 chunks of 128; byte m holds values
// m + 32 l at bits 2 l.
std::vector<float> decode_tq2_0(const uint8_t* p, int64_t n) {
  std::vector<float> out;
  for (int64_t b = 0; b < n / 256; ++b, p += 66) {
    const float d = half_to_float(uint16_t(p[64] | (p[65] << 8)));
    for (int j = 0; j < 64; j += 32)
      for (int l = 0; l < 4; ++l)
        for (int m = 0; m < 32; ++m) out.push_back(float(((p[j + m] >> (2 * l)) & 3) - 1) * d);
  }
  return out;
}

// ggml's dequantize_row_tq1_0, restated.
std::vector<float> decode_tq1_0(const uint8_t* p, int64_t n) {
  const uint8_t pow3[6] = {1, 3, 9, 27, 81, 243};
  std::vector<float> out;
  auto trit = [&](uint8_t byte, int k) { return float(((uint16_t(uint8_t(byte * pow3[k])) * 3) >> 8) - 1); };
  for (int64_t b = 0; b < n / 256; ++b, p += 54) {
    const float d = half_to_float(uint16_t(p[52] | (p[53] << 8)));
    for (int k = 0; k < 5; ++k)
      for (int m = 0; m < 32; ++m) out.push_back(trit(p[m], k) * d);
    for (int k = 0; k < 5; ++k)
      for (int m = 0; m < 16; ++m) out.push_back(trit(p[32 + m], k) * d);
    for (int k = 0; k < 4; ++k)
      for (int j = 0; j < 4; ++j) out.push_back(trit(p[48 + j], k) * d);
  }
  return out;
}

TEST(Gguf, TernaryBlocksDecodeToTheirCodes) {
  std::mt19937_64 rng(run_seed());
  SCOPED_TRACE(cat("seed ", run_seed()));
  for (int trial = 0; trial < 20; ++trial) {
    const int64_t n = 256 * (1 + trial % 4);
    std::vector<int8_t> codes(static_cast<size_t>(n));
    for (auto& c : codes) c = int8_t(int(rng() % 3) - 1);
    if (trial == 0) std::fill(codes.begin(), codes.begin() + 256, 0);  // an all-zero block: d = 0
    const std::vector<uint8_t> q2 = tq2_0_row(codes.data(), n), q1 = tq1_0_row(codes.data(), n);
    ASSERT_EQ(int64_t(q2.size()), n / 256 * 66);
    ASSERT_EQ(int64_t(q1.size()), n / 256 * 54);
    const std::vector<float> d2 = decode_tq2_0(q2.data(), n), d1 = decode_tq1_0(q1.data(), n);
    for (int64_t i = 0; i < n; ++i) {
      ASSERT_EQ(d2[size_t(i)], float(codes[size_t(i)])) << "tq2_0 value " << i;
      ASSERT_EQ(d1[size_t(i)], float(codes[size_t(i)])) << "tq1_0 value " << i;
    }
  }
  EXPECT_THROW(tq2_0_row(nullptr, 100), Error);
}

TEST(Gguf, HalvesRoundToTheNearest) {
  EXPECT_EQ(float_to_half(1.0f), 0x3C00);
  EXPECT_EQ(float_to_half(-2.0f), 0xC000);
  EXPECT_EQ(float_to_half(65504.0f), 0x7BFF);
  EXPECT_EQ(float_to_half(65520.0f), 0x7C00);  // past the largest half: infinity
  EXPECT_EQ(float_to_half(0.0f), 0x0000);
  std::mt19937_64 rng(run_seed());
  SCOPED_TRACE(cat("seed ", run_seed()));
  std::uniform_real_distribution<float> exponent(-26, 17), unit(1, 2);
  for (int i = 0; i < 20000; ++i) {
    const float x = std::ldexp(unit(rng), int(exponent(rng))) * (i % 2 ? -1.0f : 1.0f);
    const uint16_t h = float_to_half(x);
    const float err = std::fabs(half_to_float(h) - x);
    if (std::fabs(x) >= 65520.0f) continue;
    for (int step : {-1, 1}) {  // no neighbour is nearer (ties go to the even mantissa)
      const uint16_t other = uint16_t(h + step);
      if ((other & 0x7C00) == 0x7C00) continue;
      const float other_err = std::fabs(half_to_float(other) - x);
      ASSERT_TRUE(err < other_err || (err == other_err && (h & 1) == 0)) << x;
    }
  }
}

TEST(Gguf, BytesMapToGpt2sPrintableText) {
  EXPECT_EQ(gpt2_byte_token('A'), "A");
  EXPECT_EQ(gpt2_byte_token(' '), "\xC4\xA0");   // U+0120, GPT-2's "Ġ"
  EXPECT_EQ(gpt2_byte_token('\n'), "\xC4\x8A");  // U+010A, "Ċ"
  std::set<std::string> distinct;
  for (int b = 0; b < 256; ++b) distinct.insert(gpt2_byte_token(uint8_t(b)));
  EXPECT_EQ(distinct.size(), 256u);
}

// A small GGUF reader: metadata and tensors by name.
struct GgufFile {
  std::map<std::string, std::string> strings;
  std::map<std::string, uint64_t> numbers;
  std::map<std::string, std::vector<std::string>> string_arrays;
  struct Tensor {
    std::vector<int64_t> ne;
    uint32_t type;
    const uint8_t* data = nullptr;
  };
  std::map<std::string, Tensor> tensors;
  std::string bytes;
};

GgufFile read_gguf(const std::string& path) {
  GgufFile f;
  std::ifstream in(path, std::ios::binary);
  f.bytes.assign(std::istreambuf_iterator<char>(in), {});
  size_t at = 0;
  auto take = [&](void* out, size_t n) {
    if (at + n > f.bytes.size()) throw std::runtime_error("truncated");
    std::memcpy(out, f.bytes.data() + at, n);
    at += n;
  };
  auto u32 = [&] { uint32_t v; take(&v, 4); return v; };
  auto u64 = [&] { uint64_t v; take(&v, 8); return v; };
  auto str = [&] { const uint64_t n = u64(); std::string s(f.bytes.data() + at, n); at += n; return s; };
  char magic[4];
  take(magic, 4);
  EXPECT_EQ(std::string(magic, 4), "GGUF");
  EXPECT_EQ(u32(), 3u);
  const uint64_t tensors = u64(), kvs = u64();
  for (uint64_t i = 0; i < kvs; ++i) {
    const std::string key = str();
    const uint32_t type = u32();
    if (type == 8) f.strings[key] = str();
    else if (type == 4 || type == 5) f.numbers[key] = u32();
    else if (type == 6) { float v; take(&v, 4); f.numbers[key] = uint64_t(v * 1e9); }
    else if (type == 7) { at += 1; f.numbers[key] = uint8_t(f.bytes[at - 1]); }
    else if (type == 9) {
      const uint32_t elem = u32();
      const uint64_t n = u64();
      for (uint64_t j = 0; j < n; ++j) {
        if (elem == 8) f.string_arrays[key].push_back(str());
        else at += elem == 0 || elem == 1 || elem == 7 ? 1 : elem == 2 || elem == 3 ? 2 : elem >= 10 ? 8 : 4;
      }
    } else {
      ADD_FAILURE() << "unexpected type " << type << " of " << key;
    }
  }
  std::vector<std::pair<std::string, uint64_t>> offsets;
  for (uint64_t i = 0; i < tensors; ++i) {
    const std::string name = str();
    GgufFile::Tensor t;
    const uint32_t dims = u32();
    for (uint32_t j = 0; j < dims; ++j) t.ne.push_back(int64_t(u64()));
    t.type = u32();
    offsets.push_back({name, u64()});
    f.tensors[name] = t;
  }
  const size_t data_start = (at + 31) / 32 * 32;
  for (const auto& [name, offset] : offsets) {
    EXPECT_EQ(offset % 32, 0u) << name;
    f.tensors[name].data = reinterpret_cast<const uint8_t*>(f.bytes.data()) + data_start + offset;
  }
  return f;
}

std::string export_small_model(const std::string& dir, const std::vector<std::string>& sets, const std::string& type) {
  TrainConfig c = parse_train_config("", "test", sets);
  c.data.sources = {std::string(HYBRIT_SOURCE_DIR) + "/configs"};  // a few records, always present
  c.data.format = "lines";
  c.train.sample_tokens = 0;
  Trainer t(c);
  t.step();
  const std::string ckpt = dir + "/model.h5", out = dir + "/model.gguf";
  t.save(ckpt);
  Dispatcher d;
  GgufExportOptions o;
  o.type = type;
  export_gguf(d, ckpt, out, o);
  return ckpt;
}

TEST(Gguf, AnExportHoldsExactlyTheWeightsHybritRuns) {
  TempDir tmp;
  const std::string dir = tmp.path.string();
  // dim 256 and ffn 512: every row a whole number of TQ blocks; then ffn 320: w_down falls back to F16.
  for (const auto& [ffn, type] : std::vector<std::pair<int, std::string>>{{512, "tq2_0"}, {512, "tq1_0"}, {320, "tq2_0"}, {512, "f16"}}) {
    SCOPED_TRACE(type + " ffn " + std::to_string(ffn));
    const std::string ckpt = export_small_model(dir, {"model.dim=256", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.subln=true",
                                                      "model.tied_embeddings=true", cat("model.ffn_hidden=", ffn), "model.context=16", "train.batch=2"},
                                                type);
    const GgufFile f = read_gguf(dir + "/model.gguf");
    EXPECT_EQ(f.strings.at("general.architecture"), "bitnet");
    EXPECT_EQ(f.numbers.at("bitnet.block_count"), 2u);
    EXPECT_EQ(f.numbers.at("bitnet.attention.head_count_kv"), 2u);
    EXPECT_EQ(f.numbers.at("bitnet.feed_forward_length"), uint64_t(ffn));
    EXPECT_EQ(f.string_arrays.at("tokenizer.ggml.tokens").size(), 257u);
    EXPECT_EQ(f.string_arrays.at("tokenizer.ggml.tokens")[' '], "\xC4\xA0");
    EXPECT_EQ(f.numbers.at("tokenizer.ggml.eos_token_id"), 256u);
    EXPECT_FALSE(f.tensors.count("output.weight"));  // the head is the embedding
    CheckpointMeta meta;
    Dispatcher d;
    for (const NamedArray& a : read_checkpoint_arrays(ckpt, &meta)) {
      if (a.name.rfind("params/", 0) != 0) continue;
      const std::string name = a.name.substr(7);
      if (name.rfind("blocks.", 0) != 0 || a.shape.size() != 2) continue;
      // blocks.L.wq -> blk.L.attn_q, ...
      const std::map<std::string, std::string> names = {{"wq", "attn_q"}, {"wk", "attn_k"}, {"wv", "attn_v"}, {"wo", "attn_output"},
                                                         {"w_gate", "ffn_gate"}, {"w_up", "ffn_up"}, {"w_down", "ffn_down"}};
      const size_t dot = name.find('.', 7);
      const std::string gname = "blk." + name.substr(7, dot - 7) + "." + names.at(name.substr(dot + 1));
      const GgufFile::Tensor& t = f.tensors.at(gname + ".weight");
      const int64_t rows = a.shape[0], cols = a.shape[1];
      EXPECT_EQ(t.ne, (std::vector<int64_t>{cols, rows})) << gname;
      Tensor w = Tensor::wrap(const_cast<float*>(a.values.data()), a.shape, DType::f32, nullptr);
      Tensor q = Tensor::empty(a.shape, DType::i8);
      const float scale = d.quantize_ternary(w, q);
      float stored_scale;
      std::memcpy(&stored_scale, f.tensors.at(gname + ".scale").data, 4);
      EXPECT_EQ(stored_scale, scale) << gname;
      const uint32_t expected_type = type == "f16" || cols % 256 ? 1u : type == "tq2_0" ? 35u : 34u;
      ASSERT_EQ(t.type, expected_type) << gname;
      std::vector<float> values;
      if (t.type == 35) values = decode_tq2_0(t.data, rows * cols);
      else if (t.type == 34) values = decode_tq1_0(t.data, rows * cols);
      else
        for (int64_t i = 0; i < rows * cols; ++i) values.push_back(half_to_float(uint16_t(t.data[2 * i] | (t.data[2 * i + 1] << 8))));
      const int8_t* codes = q.data<int8_t>();
      for (int64_t i = 0; i < rows * cols; ++i) ASSERT_EQ(values[size_t(i)], float(codes[i])) << gname << " value " << i;
    }
    // The embedding travels as F32, bit for bit.
    const GgufFile::Tensor& emb = f.tensors.at("token_embd.weight");
    EXPECT_EQ(emb.type, 0u);
  }
}

// One file serves both ways: hybrit runs the GGUF it wrote with exactly the checkpoint's weights.
TEST(Gguf, HybritRunsTheGgufItWroteAsTheCheckpoint) {
  TempDir tmp;
  const std::string dir = tmp.path.string();
  for (const std::string type : {"tq2_0", "tq1_0", "f16"}) {
    SCOPED_TRACE(type);
    const std::string ckpt = export_small_model(dir, {"model.dim=256", "model.n_layers=1", "model.n_heads=2", "model.subln=true", "model.tied_embeddings=true",
                                                      "model.ffn_hidden=320", "model.context=32", "train.batch=2"},
                                                type);
    Dispatcher d;
    InferenceModel from_ckpt(d, ckpt), from_gguf(d, dir + "/model.gguf");
    EXPECT_EQ(from_gguf.config().dim, 256);
    EXPECT_EQ(from_gguf.config().hidden(), 320);
    EXPECT_EQ(from_gguf.tokenizer().vocab_size(), 257);
    const std::vector<int32_t> prompt = {72, 101, 108, 108, 111, 32, 256, 10};
    EXPECT_EQ(from_gguf.last_logits(prompt), from_ckpt.last_logits(prompt));
  }
}

// A BPE model's tokenizer travels as an SPM vocabulary (pieces, scores, kinds) and reads back as
// the same tokenizer.
TEST(Gguf, ABpeTokenizerTravelsWithTheModel) {
  TempDir tmp;
  const std::string dir = tmp.path.string();
  const std::string ckpt = export_small_model(dir, {"model.dim=256", "model.n_layers=1", "model.n_heads=2", "model.subln=true", "model.tied_embeddings=true",
                                                    "model.ffn_hidden=256", "model.context=32", "train.batch=2", "data.tokenizer=bpe", "data.vocab_size=600"},
                                              "tq2_0");
  const GgufFile f = read_gguf(dir + "/model.gguf");
  EXPECT_EQ(f.strings.at("tokenizer.ggml.model"), "llama");
  CheckpointMeta meta;
  read_checkpoint_arrays(ckpt, &meta);
  const std::vector<TokenizerPiece> pieces = bpe_pieces(meta.tokenizer_model, ckpt);
  const std::vector<std::string>& tokens = f.string_arrays.at("tokenizer.ggml.tokens");
  ASSERT_EQ(tokens.size(), pieces.size());
  for (size_t i = 0; i < pieces.size(); ++i) EXPECT_EQ(tokens[i], pieces[i].text) << i;
  Dispatcher d;
  InferenceModel from_ckpt(d, ckpt), from_gguf(d, dir + "/model.gguf");
  std::vector<int32_t> a, b;
  from_ckpt.tokenizer().encode("name: tiny, steps 1234", a);
  from_gguf.tokenizer().encode("name: tiny, steps 1234", b);
  EXPECT_EQ(a, b);
  EXPECT_EQ(from_gguf.last_logits(a), from_ckpt.last_logits(a));
}

std::string file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// `content` written to `path` and read as a GGUF model: the one-line error, or "no error".
std::string read_error(Dispatcher& d, const std::string& path, const std::string& content) {
  std::ofstream(path, std::ios::binary) << content;
  try {
    read_gguf_model(d, path);
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos);
    return e.what();
  }
  return "no error";
}

TEST(Gguf, DamagedFilesAreOneLineErrors) {
  TempDir tmp;
  const std::string dir = tmp.path.string();
  export_small_model(dir, {"model.dim=64", "model.n_layers=1", "model.subln=true", "model.tied_embeddings=true", "model.context=16", "train.batch=2"}, "tq2_0");
  const std::string bytes = file_bytes(dir + "/model.gguf");
  Dispatcher d;
  auto error_of = [&](const std::string& content) { return read_error(d, dir + "/bad.gguf", content); };
  // Every truncation is refused (never read past the end).
  for (size_t cut : {size_t(4), size_t(10), size_t(30), bytes.size() / 3, bytes.size() / 2, bytes.size() - 40})  // the last 32 bytes may be padding
    EXPECT_NE(error_of(bytes.substr(0, cut)).find("bad.gguf"), std::string::npos) << cut;
  // Another architecture.
  std::string other = bytes;
  other.replace(other.find("bitnet"), 6, "llama6");
  EXPECT_NE(error_of(other).find("architecture 'llama6'"), std::string::npos) << error_of(other);
  // A float key written as another type reads as 0: refused, not run with RoPE base 0.
  std::string zero_theta = bytes;
  const size_t key = zero_theta.find("bitnet.rope.freq_base");
  ASSERT_NE(key, std::string::npos);
  zero_theta.replace(key + std::strlen("bitnet.rope.freq_base"), 4, std::string("\x04\0\0\0", 4));  // type FLOAT32 -> UINT32
  EXPECT_NE(error_of(zero_theta).find("rope.freq_base: expected a number > 0"), std::string::npos) << error_of(zero_theta);
  // Random bytes after the header, from a fresh seed each run.
  Rng rng(run_seed(), 99);
  for (int trial = 0; trial < 50; ++trial) {
    std::string noisy = bytes;
    for (int k = 0; k < 8; ++k) noisy[size_t(24 + rng.below(uint64_t(noisy.size() - 24)))] = char(rng.below(256));
    const std::string path = dir + "/noisy.gguf";
    std::ofstream(path, std::ios::binary) << noisy;
    try {
      read_gguf_model(d, path);  // may load (the noise fell in a weight) or refuse; never crash
    } catch (const Error&) {
    }
  }
}

// A TQ2_0 block's scale (the f16 after its 64 code bytes): not finite, or another magnitude than the
// tensor's other blocks, is refused naming the tensor; a negated one negates the block's codes.
TEST(Gguf, BlockScalesAreCheckedAndApplied) {
  TempDir tmp;
  const std::string dir = tmp.path.string();
  export_small_model(dir, {"model.dim=256", "model.n_layers=1", "model.n_heads=2", "model.subln=true", "model.tied_embeddings=true",
                           "model.ffn_hidden=256", "model.context=16", "train.batch=2"},
                     "tq2_0");
  const std::string bytes = file_bytes(dir + "/model.gguf");
  Dispatcher d;
  auto error_of = [&](const std::string& content) { return read_error(d, dir + "/bad.gguf", content); };
  const GgufFile parsed = read_gguf(dir + "/model.gguf");
  const GgufFile::Tensor& wq = parsed.tensors.at("blk.0.attn_q.weight");
  ASSERT_EQ(wq.type, 35u);
  const size_t scale_at = size_t(wq.data - reinterpret_cast<const uint8_t*>(parsed.bytes.data())) + 64;
  auto with_block_scale = [&](uint16_t half) {
    std::string patched = bytes;
    patched[scale_at] = char(half & 0xff), patched[scale_at + 1] = char(half >> 8);
    return patched;
  };
  EXPECT_NE(error_of(with_block_scale(0x7e00)).find("blk.0.attn_q.weight has block scale nan"), std::string::npos)
      << error_of(with_block_scale(0x7e00));
  EXPECT_NE(error_of(with_block_scale(0x4000)).find("blk.0.attn_q.weight holds 1 and 2: not ternary codes times one scale"), std::string::npos)
      << error_of(with_block_scale(0x4000));
  {
    const std::string path = dir + "/negated.gguf";
    std::ofstream(path, std::ios::binary) << with_block_scale(0xbc00);  // -1.0
    const InferenceExport negated = read_gguf_model(d, path), original = read_gguf_model(d, dir + "/model.gguf");
    const auto& a = negated.packed.at("blocks.0.wq").codes;
    const auto& b = original.packed.at("blocks.0.wq").codes;
    ASSERT_EQ(a.size(), b.size());
    // Packed codes are weight + 1 per 2 bits: negating a weight maps code c to 2 - c.
    const int64_t row_bytes = (negated.packed.at("blocks.0.wq").cols + 3) / 4;
    for (int64_t i = 0; i < int64_t(a.size()); ++i)
      for (int f = 0; f < 4; ++f) {
        const int ca = (a[size_t(i)] >> (2 * f)) & 3, cb = (b[size_t(i)] >> (2 * f)) & 3;
        EXPECT_EQ(ca, i < row_bytes ? 2 - cb : cb) << "byte " << i << " field " << f;  // the first block is the first 256 weights of row 0
      }
  }
}

TEST(Gguf, RefusesModelsLlamaCppHasNoGraphFor) {
  TempDir tmp;
  const std::string dir = tmp.path.string();
  try {
    export_small_model(dir, {"model.dim=64", "model.n_layers=1", "model.subln=false", "model.ffn=relu2", "train.batch=2", "model.context=16"}, "tq2_0");
    ADD_FAILURE() << "exported";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("model.subln: true"), std::string::npos) << m;
    EXPECT_NE(m.find("model.ffn: swiglu"), std::string::npos) << m;
    EXPECT_NE(m.find("model.tied_embeddings: true"), std::string::npos) << m;
  }
  EXPECT_FALSE(std::filesystem::exists(dir + "/model.gguf"));
}

}  // namespace
}  // namespace hybrit::test
