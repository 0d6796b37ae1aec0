// The inference side of a trained model: BitLinear weights packed at 2 bits with their scales,
// int8 activations, `matmul_ternary` through the dispatcher, and a paged KV cache (a pool of
// 16-token blocks, a block table per sequence, full blocks shared between sequences by a chained
// hash of their tokens). forward() runs any mix of prefill chunks and decode tokens of many
// sequences in one pass; every row is computed independently of the others, so a sequence's
// logits do not depend on what it is batched with.
#pragma once
#include <algorithm>
#include <cstdint>
#include <list>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "model/checkpoint.hpp"
#include "model/kernels.hpp"

namespace hybrit {

inline constexpr int64_t kKvBlockTokens = kernels::kAttentionBlock;  // positions per KV block

// The pool of KV blocks. A block holds K and V of 16 positions for every layer and KV head.
// Blocks are reference-counted; a full block can be registered under the chained hash of the
// tokens up to its end, and another sequence with the same prefix reuses it. Unreferenced
// registered blocks stay cached (least recently released first out) until the space is needed.
class KvCache {
 public:
  KvCache(int64_t blocks, int64_t layers, int64_t kv_heads, int64_t head_dim);

  int64_t blocks() const { return blocks_; }
  // A block for writing (refcount 1), or -1 when every block is referenced.
  int32_t allocate();
  void retain(int32_t block) { ++refs_[size_t(block)]; }
  void release(int32_t block);
  // A registered block for `hash` (retained for the caller), or -1.
  int32_t lookup(uint64_t hash);
  void register_block(uint64_t hash, int32_t block);
  // Blocks allocate() could hand out now (free plus cached-but-unreferenced).
  int64_t available() const { return int64_t(free_.size() + evictable_.size()); }

  // A block's keys for one layer, transposed: key c of KV head h at slot s is
  // keys[(h * head_dim + c) * kKvBlockTokens + s], so one query's 16 scores against a block are
  // 16-wide vector products with no horizontal sums (kernels::attention_block_scores).
  float* keys(int32_t block, int64_t layer) { return data_.data() + offset(block, layer, 0, 0); }
  // A slot's values: kv_heads x head_dim floats; a block's slots follow each other, row() floats apart.
  float* value(int32_t block, int64_t layer, int64_t slot) { return data_.data() + offset(block, layer, slot, 1); }
  int64_t row() const { return row_; }
  // One position's K and V (kv_heads x head_dim floats each) into its slot, keys transposed.
  void store(int32_t block, int64_t layer, int64_t slot, const float* k, const float* v) {
    float* keys_at = keys(block, layer) + slot;
    for (int64_t e = 0; e < row_; ++e) keys_at[e * kKvBlockTokens] = k[e];
    std::copy_n(v, row_, value(block, layer, slot));
  }

  struct Stats {
    int64_t blocks = 0, in_use = 0, cached = 0, free = 0;
    int64_t prefix_lookups = 0, prefix_hits = 0;
  };
  Stats stats() const;

 private:
  size_t offset(int32_t block, int64_t layer, int64_t slot, int kv) const {
    return size_t((((int64_t(block) * layers_ + layer) * 2 + kv) * kKvBlockTokens + slot) * row_);
  }
  int64_t blocks_, layers_, row_;
  std::vector<float> data_;
  std::vector<int32_t> refs_;
  std::vector<uint64_t> hash_of_;  // 0: not registered
  std::vector<char> registered_;
  std::vector<int32_t> free_;
  std::list<int32_t> evictable_;  // registered, unreferenced; front = released longest ago
  std::unordered_map<int32_t, std::list<int32_t>::iterator> evictable_at_;
  std::unordered_map<uint64_t, int32_t> by_hash_;
  int64_t lookups_ = 0, hits_ = 0;
};

// One sequence's part of a forward pass: `count` new tokens at positions start .. start+count-1,
// whose K and V go to the blocks of `block_table` (which must cover them).
struct ForwardSlice {
  const int32_t* tokens = nullptr;
  int64_t start = 0, count = 0;
  const std::vector<int32_t>* block_table = nullptr;
  bool want_logits = false;  // the logits of the slice's last token
};

class InferenceModel {
 public:
  // A training checkpoint (.h5), whose BitLinear weights are quantized and packed here, or its
  // export (`hybrit checkpoint export`), already packed: the two give the same model.
  // packed = false keeps f32 weights (quant none models always do).
  InferenceModel(Dispatcher& dispatcher, const std::string& checkpoint, bool packed = true);

  const ModelConfig& config() const { return config_; }
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  Dispatcher& dispatcher() { return d_; }
  bool packed() const { return packed_; }
  // Bytes of weights read per forward pass (packed BitLinears + f32 embeddings row, norms, head).
  int64_t weight_bytes() const { return weight_bytes_; }
  // Bytes of K and V per token position (all layers).
  int64_t kv_bytes_per_token() const { return 2 * config_.n_layers * config_.kv_heads() * config_.head_dim() * int64_t(sizeof(float)); }

  // Runs the slices; returns (slices wanting logits, vocab) f32, in slice order.
  Tensor forward(const std::vector<ForwardSlice>& slices, KvCache& cache);
  // The next-token logits after `tokens` (one sequence, a cache of its own): what the engine
  // samples from, for checks against the training forward.
  std::vector<float> last_logits(const std::vector<int32_t>& tokens);

 private:
  struct Linear {
    int64_t rows = 0, cols = 0;
    Tensor packed;      // ternary2 (rows, ceil(cols / 4)) when packed_
    float scale = 1.0f;
    Tensor weights;     // f32 (rows, cols) otherwise
  };
  struct Layer {
    Tensor attn_norm, attn_sub_norm, ffn_norm, ffn_sub_norm;
    Linear wq, wk, wv, wo, w_gate, w_up, w_down;
  };
  struct LinearInput {
    const Tensor* x = nullptr;
    Tensor q, s;        // int8 rows and their scales (ternary models)
    Tensor dequantized; // q / s as f32 (f32 ternary weights)
  };
  LinearInput linear_input(const Tensor& x);
  void linear(const LinearInput& in, const Linear& l, Tensor& y);

  Dispatcher& d_;
  ModelConfig config_;
  std::unique_ptr<Tokenizer> tokenizer_;
  bool packed_;
  Tensor tok_emb_, final_norm_, head_;
  std::vector<Layer> layers_;
  std::vector<float> rope_cos_, rope_sin_;
  int64_t weight_bytes_ = 0;
};

}  // namespace hybrit
