#include "inference/model.hpp"
#include "inference/gguf.hpp"
#include "model/kernels.hpp"


#include <algorithm>
#include <cmath>
#include <cstring>

namespace hybrit {

// ---------------------------------------------------------------------------------------------
// KV cache

KvCache::KvCache(int64_t blocks, int64_t layers, int64_t kv_heads, int64_t head_dim)
    : blocks_(blocks), layers_(layers), row_(kv_heads * head_dim) {
  if (blocks < 1) fail(ErrorKind::invalid_argument, "kv cache: at least one block is needed, got ", blocks);
  data_.assign(size_t(blocks * layers * 2 * kKvBlockTokens * row_), 0.0f);
  refs_.assign(size_t(blocks), 0);
  hash_of_.assign(size_t(blocks), 0);
  registered_.assign(size_t(blocks), 0);
  for (int64_t b = blocks - 1; b >= 0; --b) free_.push_back(int32_t(b));
}

int32_t KvCache::allocate() {
  int32_t b = -1;
  if (!free_.empty()) {
    b = free_.back();
    free_.pop_back();
  } else if (!evictable_.empty()) {
    b = evictable_.front();  // the cached prefix released longest ago goes first
    evictable_.pop_front();
    evictable_at_.erase(b);
    by_hash_.erase(hash_of_[size_t(b)]);
    registered_[size_t(b)] = 0;
  } else {
    return -1;
  }
  refs_[size_t(b)] = 1;
  return b;
}

void KvCache::release(int32_t b) {
  if (--refs_[size_t(b)] > 0) return;
  if (registered_[size_t(b)]) {
    evictable_.push_back(b);
    evictable_at_[b] = std::prev(evictable_.end());
  } else {
    free_.push_back(b);
  }
}

int32_t KvCache::lookup(uint64_t hash) {
  ++lookups_;
  auto it = by_hash_.find(hash);
  if (it == by_hash_.end()) return -1;
  ++hits_;
  const int32_t b = it->second;
  if (refs_[size_t(b)] == 0) {
    evictable_.erase(evictable_at_[b]);
    evictable_at_.erase(b);
  }
  ++refs_[size_t(b)];
  return b;
}

void KvCache::register_block(uint64_t hash, int32_t b) {
  if (registered_[size_t(b)] || by_hash_.count(hash)) return;  // the first copy of a prefix is the one shared
  by_hash_[hash] = b;
  hash_of_[size_t(b)] = hash;
  registered_[size_t(b)] = 1;
}

KvCache::Stats KvCache::stats() const {
  Stats s;
  s.blocks = blocks_;
  s.free = int64_t(free_.size());
  s.cached = int64_t(evictable_.size());
  s.in_use = blocks_ - s.free - s.cached;
  s.prefix_lookups = lookups_;
  s.prefix_hits = hits_;
  return s;
}

// ---------------------------------------------------------------------------------------------
// Model

namespace {

// Multiply-adds below which a loop stays on the calling thread: a TBB fork and join costs several
// microseconds, more than a decode step's small pieces take on their own.
constexpr int64_t kParallelWork = int64_t(1) << 17;

// body(begin, end) over [0, n), split between the dispatcher's threads only when the whole is
// worth it (each piece's results depend on its own indices alone).
template <class Body>
void maybe_parallel(Dispatcher& d, int64_t n, int64_t work, int64_t grain, const Body& body) {
  if (work < kParallelWork) return body(int64_t(0), n);
  d.parallel_for(n, grain, body);
}

// y (n, rows) = x (n, cols) W^T (W is (rows, cols)), each element a dot in one fixed order, so a
// row's result does not depend on the other rows (a GEMM's blocking may depend on the shape).
void matmul_rows(Dispatcher& d, const float* x, int64_t n, int64_t cols, const float* w, int64_t rows, float* y) {
  maybe_parallel(d, rows, n * rows * cols, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r != end; ++r) {
      const float* wr = w + r * cols;
      for (int64_t i = 0; i < n; ++i) {
        const float* xi = x + i * cols;
        float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t j = 0;
        for (; j + 8 <= cols; j += 8)
          for (int l = 0; l < 8; ++l) lanes[l] += xi[j + l] * wr[j + l];
        float tail = 0;
        for (; j < cols; ++j) tail += xi[j] * wr[j];
        y[i * rows + r] = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7])) + tail;
      }
    }
  });
}


void add_into(Tensor& x, const Tensor& y) {
  float* xp = x.data<float>();
  const float* yp = y.data<float>();
  for (int64_t i = 0; i < x.numel(); ++i) xp[i] += yp[i];
}

// Query heads of one KV head attended together, at most this many per call: each key and value
// row is read once for all of them (grouped-query attention shares them).
constexpr int64_t kAttendHeads = 8;
// Consecutive query rows of one sequence (a prefill chunk) attended together, at most this many
// per call: each KV block is read once for all of them while it sits in L1.
constexpr int64_t kAttendRows = 8;

// Query rows i in [0, rows) of one sequence at positions first_pos + i, each with `heads` query
// heads of one KV head (heads x hd values, contiguous, at q + i * row_stride), against positions
// 0..(its position) in the paged cache, into out (same layout). A KV block (kKvBlockTokens
// positions) at a time, and within it each row: its scores (kernels::attention_block_scores), one
// online-softmax update per head and block, the block's exponentials in one call, then its values
// weighted in. Each row's sums run in an order fixed by its position alone, so its result does not
// depend on the rows it is grouped with or on the thread count.
void attend(const float* q, int64_t row_stride, int64_t rows, int64_t heads, int64_t first_pos, const std::vector<int32_t>& table, KvCache& cache,
            int64_t layer, int64_t kv_head, int64_t hd, float scale, float* out) {
  float scores[kAttendHeads * kKvBlockTokens], p[kAttendHeads * kKvBlockTokens], run_max[kAttendRows][kAttendHeads];
  double run_sum[kAttendRows][kAttendHeads];
  for (int64_t i = 0; i < rows; ++i) {
    std::fill(out + i * row_stride, out + i * row_stride + heads * hd, 0.0f);
    std::fill(run_max[i], run_max[i] + heads, -INFINITY);
    std::fill(run_sum[i], run_sum[i] + heads, 0.0);
  }
  const int64_t stride = cache.row(), last_pos = first_pos + rows - 1;
  for (int64_t start = 0; start <= last_pos; start += kKvBlockTokens) {
    const int32_t block = table[size_t(start / kKvBlockTokens)];
    const float* keys = cache.keys(block, layer) + kv_head * hd * kKvBlockTokens;
    const float* values = cache.value(block, layer, 0) + kv_head * hd;
    for (int64_t i = std::max<int64_t>(0, start - first_pos); i < rows; ++i) {
      const int64_t n = std::min<int64_t>(kKvBlockTokens, first_pos + i + 1 - start);
      float* out_i = out + i * row_stride;
      kernels::attention_block_scores(q + i * row_stride, heads, keys, n, hd, scale, scores);
      for (int64_t h = 0; h < heads; ++h) {
        float* sh = scores + h * n;
        const float block_max = *std::max_element(sh, sh + n);
        if (block_max > run_max[i][h]) {
          const float shrink = std::exp(run_max[i][h] - block_max);  // exp(-inf) = 0 on the first block
          run_sum[i][h] *= shrink;
          for (int64_t c = 0; c < hd; ++c) out_i[h * hd + c] *= shrink;
          run_max[i][h] = block_max;
        }
        for (int64_t j = 0; j < n; ++j) sh[j] -= run_max[i][h];
      }
      kernels::exp_values(scores, p, heads * n);
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t j = 0; j < n; ++j) run_sum[i][h] += p[h * n + j];
      kernels::attention_block_values(p, heads, values, stride, n, hd, out_i);
    }
  }
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t h = 0; h < heads; ++h) {
      const float inv = float(1.0 / run_sum[i][h]);
      for (int64_t c = 0; c < hd; ++c) out[i * row_stride + h * hd + c] *= inv;
    }
}

}  // namespace

InferenceModel::InferenceModel(Dispatcher& dispatcher, const std::string& checkpoint, bool packed) : d_(dispatcher) {
  // Two sources: a training checkpoint (f32 weights, quantized and packed here) or the export
  // file (BitLinears already packed, by the same dispatcher ops, so both give the same model).
  // A GGUF file (hybrit checkpoint export --format gguf) reads back as the export it equals.
  const bool is_gguf = is_gguf_file(checkpoint);
  const bool is_export = is_gguf || checkpoint_format(checkpoint) == kInferenceExportFormat;
  CheckpointModel cm;
  InferenceExport ex;
  if (is_export) {
    ex = is_gguf ? read_gguf_model(dispatcher, checkpoint) : read_inference_export(checkpoint);
    config_ = ex.config.model;
    tokenizer_ = std::move(ex.tokenizer);
  } else {
    cm = load_checkpoint_model(dispatcher, checkpoint);
    config_ = cm.model->config();
    tokenizer_ = std::move(cm.tokenizer);
  }
  packed_ = packed && config_.quant == ModelConfig::Quant::ternary;
  const int64_t D = config_.dim, V = config_.vocab_size, F = config_.hidden(), hd = config_.head_dim();

  auto param = [&](const std::string& name, const Shape& shape) {
    if (!is_export) return cm.model->params().param(cm.model->params().slice(name)).clone();
    const auto it = ex.f32.find(name);
    if (it == ex.f32.end()) fail(ErrorKind::corrupt_data, checkpoint, ": parameter ", name, " is missing");
    if (it->second.shape != shape)
      fail(ErrorKind::corrupt_data, checkpoint, ": parameter ", name, " has shape ", shape_str(it->second.shape), ", the config needs ", shape_str(shape));
    Tensor t = Tensor::empty(shape, DType::f32);
    std::memcpy(t.data<float>(), it->second.values.data(), size_t(t.nbytes()));
    return t;
  };
  // The ternary codes of a BitLinear and their scale: packed by the export, or quantized here.
  auto ternary_codes = [&](const std::string& name, const Shape& shape, float& scale) {
    Tensor q = Tensor::empty(shape, DType::i8);
    if (!is_export) {
      scale = d_.quantize_ternary(param(name, shape), q);
      return q;
    }
    const auto it = ex.packed.find(name);
    if (it == ex.packed.end()) fail(ErrorKind::corrupt_data, checkpoint, ": packed weight ", name, ".packed is missing");
    const InferenceExport::Packed& p = it->second;
    if (p.rows != shape[0] || p.cols != shape[1])
      fail(ErrorKind::corrupt_data, checkpoint, ": packed weight ", name, " is ", p.rows, " x ", p.cols, ", the config needs ", shape_str(shape));
    Tensor codes = Tensor::empty({p.rows, (p.cols + 3) / 4}, DType::ternary2);
    std::memcpy(codes.raw(), p.codes.data(), p.codes.size());
    d_.unpack_ternary(codes, q);  // also refuses a code that is not -1, 0 or +1
    scale = p.scale;
    return q;
  };
  auto linear = [&](const std::string& name, int64_t rows, int64_t cols) {
    Linear l;
    l.rows = rows, l.cols = cols;
    if (config_.quant != ModelConfig::Quant::ternary) {
      l.weights = param(name, {rows, cols});
    } else if (packed_) {
      const Tensor q = ternary_codes(name, {rows, cols}, l.scale);
      l.packed = Tensor::empty({rows, (cols + 3) / 4}, DType::ternary2);
      d_.pack_ternary(q, l.packed);
    } else {
      // f32 weights holding the ternary values times the scale: the training forward's weights.
      const Tensor q = ternary_codes(name, {rows, cols}, l.scale);
      l.weights = Tensor::empty({rows, cols}, DType::f32);
      const int8_t* codes = q.data<int8_t>();
      float* weights = l.weights.data<float>();
      for (int64_t i = 0; i < q.numel(); ++i) weights[i] = float(codes[i]) * l.scale;
    }
    weight_bytes_ += packed_ ? l.packed.nbytes() : l.weights.nbytes();
    return l;
  };
  tok_emb_ = param("tok_emb", {V, D});
  final_norm_ = param("final_norm", {D});
  head_ = config_.tied_embeddings ? tok_emb_ : param("head", {V, D});
  weight_bytes_ += head_.nbytes() + D * int64_t(sizeof(float));
  const int64_t q_rows = config_.n_heads * hd, kv_rows = config_.kv_heads() * hd;
  for (int64_t i = 0; i < config_.n_layers; ++i) {
    const std::string p = cat("blocks.", i, ".");
    Layer L;
    L.attn_norm = param(p + "attn_norm", {D});
    L.ffn_norm = param(p + "ffn_norm", {D});
    if (config_.subln) L.attn_sub_norm = param(p + "attn_sub_norm", {q_rows}), L.ffn_sub_norm = param(p + "ffn_sub_norm", {F});
    L.wq = linear(p + "wq", q_rows, D), L.wk = linear(p + "wk", kv_rows, D), L.wv = linear(p + "wv", kv_rows, D), L.wo = linear(p + "wo", D, q_rows);
    if (config_.ffn == ModelConfig::Ffn::swiglu) L.w_gate = linear(p + "w_gate", F, D);
    L.w_up = linear(p + "w_up", F, D), L.w_down = linear(p + "w_down", D, F);
    layers_.push_back(std::move(L));
  }
  rope_tables(config_, rope_cos_, rope_sin_);  // as the training model makes them
}

// A BitLinear's input, made once and shared by the layers that read the same rows (wq, wk, wv;
// w_gate, w_up): int8 rows with their absmax scales for the packed kernel, the training forward's
// q / s for f32 ternary weights, or the rows themselves for a full-precision model.
InferenceModel::LinearInput InferenceModel::linear_input(const Tensor& x) {
  LinearInput in;
  in.x = &x;
  if (config_.quant != ModelConfig::Quant::ternary) return in;
  const int64_t n = x.dim(0), cols = x.dim(1);
  in.q = Tensor::empty({n, cols}, DType::i8), in.s = Tensor::empty({n}, DType::f32);
  d_.quantize_int8_rows(x, in.q, in.s);
  if (!packed_) {
    in.dequantized = Tensor::empty({n, cols}, DType::f32);
    float* out = in.dequantized.data<float>();
    const int8_t* qv = in.q.data<int8_t>();
    const float* sv = in.s.data<float>();
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < cols; ++j) out[i * cols + j] = float(qv[i * cols + j]) / sv[i];
  }
  return in;
}

void InferenceModel::linear(const LinearInput& in, const Linear& l, Tensor& y) {
  const int64_t n = in.x->dim(0);
  if (packed_) return d_.matmul_ternary(in.q, in.s, l.packed, l.scale, y);
  const Tensor& x = in.dequantized.numel() ? in.dequantized : *in.x;
  matmul_rows(d_, x.data<float>(), n, l.cols, l.weights.data<float>(), l.rows, y.data<float>());
}

Tensor InferenceModel::forward(const std::vector<ForwardSlice>& slices, KvCache& cache) {
  const int64_t D = config_.dim, H = config_.n_heads, KV = config_.kv_heads(), hd = config_.head_dim(), F = config_.hidden();
  const int64_t V = config_.vocab_size, group = H / KV, half = hd / 2;
  // Rows: every new token of every slice; where each row sits (its slice, position, cache slot).
  struct Row {
    int64_t slice, pos;
  };
  std::vector<Row> rows;
  int64_t logits_rows = 0;
  for (size_t s = 0; s < slices.size(); ++s) {
    const ForwardSlice& sl = slices[s];
    if (sl.count < 1) fail(ErrorKind::invalid_argument, "inference forward: slice ", s, " has no tokens");
    if (sl.start + sl.count > config_.context)
      fail(ErrorKind::invalid_argument, "inference forward: positions up to ", sl.start + sl.count, " exceed the model's context of ", config_.context);
    if (int64_t(sl.block_table->size()) * kKvBlockTokens < sl.start + sl.count)
      fail(ErrorKind::invalid_argument, "inference forward: slice ", s, "'s block table covers ", sl.block_table->size() * kKvBlockTokens, " positions, needs ",
           sl.start + sl.count);
    for (int64_t t = 0; t < sl.count; ++t) {
      if (sl.tokens[t] < 0 || sl.tokens[t] >= V) fail(ErrorKind::invalid_argument, "inference forward: token ", sl.tokens[t], " is outside [0, ", V, ")");
      rows.push_back({int64_t(s), sl.start + t});
    }
    logits_rows += sl.want_logits;
  }
  const int64_t N = int64_t(rows.size());
  auto matrix = [](int64_t r, int64_t c) { return Tensor::empty({r, c}, DType::f32); };
  Tensor x = matrix(N, D);
  for (int64_t r = 0; r < N; ++r) {
    const ForwardSlice& sl = slices[size_t(rows[size_t(r)].slice)];
    const int32_t tok = sl.tokens[rows[size_t(r)].pos - sl.start];
    std::memcpy(x.data<float>() + r * D, tok_emb_.data<float>() + int64_t(tok) * D, size_t(D) * sizeof(float));
  }
  Tensor h = matrix(N, D), q = matrix(N, H * hd), k = matrix(N, KV * hd), v = matrix(N, KV * hd), att = matrix(N, H * hd), a = matrix(N, D);
  Tensor up = matrix(N, F), gate = matrix(N, F), f = matrix(N, F), m = matrix(N, D);
  const float scale = float(1.0 / std::sqrt(double(hd)));
  auto rotate = [&](float* vec, int64_t pos) {
    for (int64_t i = 0; i < half; ++i) {
      const float c = rope_cos_[size_t(pos * half + i)], s = rope_sin_[size_t(pos * half + i)], a0 = vec[i], b0 = vec[i + half];
      vec[i] = a0 * c - b0 * s;
      vec[i + half] = a0 * s + b0 * c;
    }
  };
  // Consecutive rows of one slice (consecutive positions), up to kAttendRows a group.
  struct RowGroup {
    int64_t row, count;
  };
  std::vector<RowGroup> row_groups;
  for (int64_t r = 0; r < N; ++r) {
    RowGroup* last = row_groups.empty() ? nullptr : &row_groups.back();
    if (last && last->count < kAttendRows && rows[size_t(last->row)].slice == rows[size_t(r)].slice) ++last->count;
    else row_groups.push_back({r, 1});
  }
  int64_t attention_work = 0;  // multiply-adds per layer: every row attends to positions 0..pos
  for (const Row& row : rows) attention_work += 2 * (row.pos + 1) * H * hd;
  for (int64_t li = 0; li < config_.n_layers; ++li) {
    Layer& L = layers_[size_t(li)];
    kernels::rmsnorm_rows(x.data<float>(), L.attn_norm.data<float>(), h.data<float>(), nullptr, 0, N, D, config_.norm_eps);
    const LinearInput attn_in = linear_input(h);
    linear(attn_in, L.wq, q);
    linear(attn_in, L.wk, k);
    linear(attn_in, L.wv, v);
    // RoPE at each row's own position, then K and V into the row's cache slot.
    for (int64_t r = 0; r < N; ++r) {
      const int64_t pos = rows[size_t(r)].pos;
      for (int64_t hh = 0; hh < H; ++hh) rotate(q.data<float>() + (r * H + hh) * hd, pos);
      for (int64_t hh = 0; hh < KV; ++hh) rotate(k.data<float>() + (r * KV + hh) * hd, pos);
      const auto& table = *slices[size_t(rows[size_t(r)].slice)].block_table;
      const int32_t block = table[size_t(pos / kKvBlockTokens)];
      cache.store(block, li, pos % kKvBlockTokens, k.data<float>() + r * KV * hd, v.data<float>() + r * KV * hd);
    }
    // Units of work: (a group of up to kAttendRows consecutive rows of one slice, a KV head, up to
    // kAttendHeads of its query heads); query head hh uses KV head hh / group, so a unit's heads
    // are adjacent in q and att.
    const int64_t head_chunks = (group + kAttendHeads - 1) / kAttendHeads, units_per_group = KV * head_chunks;
    maybe_parallel(d_, int64_t(row_groups.size()) * units_per_group, attention_work, 1, [&](int64_t begin, int64_t end) {
      for (int64_t unit = begin; unit < end; ++unit) {
        const RowGroup& g = row_groups[size_t(unit / units_per_group)];
        const int64_t kvh = unit % units_per_group / head_chunks, chunk = unit % head_chunks;
        const int64_t first = kvh * group + chunk * kAttendHeads, heads = std::min(kAttendHeads, (kvh + 1) * group - first);
        attend(q.data<float>() + (g.row * H + first) * hd, H * hd, g.count, heads, rows[size_t(g.row)].pos,
               *slices[size_t(rows[size_t(g.row)].slice)].block_table, cache, li, kvh, hd, scale, att.data<float>() + (g.row * H + first) * hd);
      }
    });
    Tensor att_in = att;
    if (config_.subln) {
      att_in = matrix(N, H * hd);
      kernels::rmsnorm_rows(att.data<float>(), L.attn_sub_norm.data<float>(), att_in.data<float>(), nullptr, 0, N, H * hd, config_.norm_eps);
    }
    linear(linear_input(att_in), L.wo, a);
    add_into(x, a);
    kernels::rmsnorm_rows(x.data<float>(), L.ffn_norm.data<float>(), h.data<float>(), nullptr, 0, N, D, config_.norm_eps);
    const LinearInput ffn_in = linear_input(h);
    linear(ffn_in, L.w_up, up);
    float* fp = f.data<float>();
    const float* upp = up.data<float>();
    if (config_.ffn == ModelConfig::Ffn::swiglu) {
      linear(ffn_in, L.w_gate, gate);
      const float* gp = gate.data<float>();
      kernels::swiglu(gp, upp, fp, 0, N * F);
    } else {
      for (int64_t i = 0; i < N * F; ++i) fp[i] = upp[i] > 0 ? upp[i] * upp[i] : 0.0f;
    }
    Tensor f_in = f;
    if (config_.subln) {
      f_in = matrix(N, F);
      kernels::rmsnorm_rows(f.data<float>(), L.ffn_sub_norm.data<float>(), f_in.data<float>(), nullptr, 0, N, F, config_.norm_eps);
    }
    linear(linear_input(f_in), L.w_down, m);
    add_into(x, m);
  }
  // Final norm and head for the last row of each slice that wants logits.
  Tensor last = matrix(std::max<int64_t>(logits_rows, 1), D), logits = Tensor::empty({logits_rows, V}, DType::f32);
  int64_t out_row = 0, row = 0;
  for (const ForwardSlice& sl : slices) {
    row += sl.count;
    if (!sl.want_logits) continue;
    kernels::rmsnorm_rows(x.data<float>() + (row - 1) * D, final_norm_.data<float>(), last.data<float>() + out_row * D, nullptr, 0, 1, D, config_.norm_eps);
    ++out_row;
  }
  if (logits_rows > 0) matmul_rows(d_, last.data<float>(), logits_rows, D, head_.data<float>(), V, logits.data<float>());
  return logits;
}

std::vector<float> InferenceModel::last_logits(const std::vector<int32_t>& tokens) {
  if (tokens.empty()) fail(ErrorKind::invalid_argument, "last_logits: no tokens");
  KvCache cache((int64_t(tokens.size()) + kKvBlockTokens - 1) / kKvBlockTokens, config_.n_layers, config_.kv_heads(), config_.head_dim());
  std::vector<int32_t> table;
  for (int64_t b = 0; b < cache.blocks(); ++b) table.push_back(cache.allocate());
  ForwardSlice s;
  s.tokens = tokens.data(), s.count = int64_t(tokens.size()), s.block_table = &table, s.want_logits = true;
  const Tensor logits = forward({s}, cache);
  return std::vector<float>(logits.data<float>(), logits.data<float>() + config_.vocab_size);
}

}  // namespace hybrit
