#include "model/model.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/rng.hpp"
#include "model/kernels.hpp"

namespace hybrit {

int64_t ModelConfig::hidden() const {
  if (ffn_hidden > 0) return ffn_hidden;
  const int64_t h = ffn == Ffn::swiglu ? (8 * dim + 2) / 3 : 4 * dim;
  return (h + 31) / 32 * 32;
}

void ModelConfig::validate() const {
  auto positive = [](int64_t v, const char* key, int64_t most) {
    if (v <= 0) fail(ErrorKind::invalid_argument, "model.", key, " must be positive, got ", v);
    if (v > most) fail(ErrorKind::invalid_argument, "model.", key, " must be at most ", most, ", got ", v);
  };
  positive(vocab_size, "vocab_size", kMaxVocab);
  positive(dim, "dim", kMaxDim);
  positive(n_layers, "n_layers", kMaxLayers);
  positive(n_heads, "n_heads", kMaxHeads);
  if (n_kv_heads < 0 || n_kv_heads > kMaxHeads)
    fail(ErrorKind::invalid_argument, "model.n_kv_heads must be in [1, ", kMaxHeads, "] (or 0: as many as n_heads), got ", n_kv_heads);
  positive(context, "context", kMaxContext);
  if (ffn_hidden < 0 || ffn_hidden > kMaxFfnHidden)
    fail(ErrorKind::invalid_argument, "model.ffn_hidden must be in [1, ", kMaxFfnHidden, "] (or 0 for the default), got ", ffn_hidden);
  if (dim % n_heads) fail(ErrorKind::invalid_argument, "model.dim (", dim, ") must be divisible by model.n_heads (", n_heads, ")");
  if (n_heads % kv_heads())
    fail(ErrorKind::invalid_argument, "model.n_heads (", n_heads, ") must be divisible by model.n_kv_heads (", kv_heads(), ")");
  if (head_dim() % 2) fail(ErrorKind::invalid_argument, "model.dim / model.n_heads = ", head_dim(), " must be even (RoPE rotates pairs)");
  if (!(rope_theta > 0)) fail(ErrorKind::invalid_argument, "model.rope_theta must be positive, got ", rope_theta);
  if (!(norm_eps > 0)) fail(ErrorKind::invalid_argument, "model.norm_eps must be positive, got ", norm_eps);
}

namespace {

// A buffer of this shape, reallocated only when the shape changes: steps of one shape reuse their
// memory (a fresh multi-megabyte allocation per step costs page faults and zeroing).
Tensor& ensure(Tensor& t, Shape shape, DType dtype = DType::f32) {
  if (!t.defined() || t.numel() == 0 || t.shape() != shape || t.dtype() != dtype) t = Tensor::empty(std::move(shape), dtype);
  return t;
}
Tensor& ensure_matrix(Tensor& t, int64_t rows, int64_t cols) { return ensure(t, {rows, cols}); }
// A view of `shape` into a buffer that grows to the largest shape asked of it (the quantizers'
// int8 outputs, whose shape changes from layer to layer).
Tensor scratch_view(Tensor& buffer, const Shape& shape, DType dtype) {
  int64_t n = 1;
  for (int64_t e : shape) n *= e;
  if (!buffer.defined() || buffer.numel() < n || buffer.dtype() != dtype) buffer = Tensor::empty({std::max<int64_t>(n, 1)}, dtype);
  return buffer.rows(0, n).reshape(shape);
}

}  // namespace

void rope_tables(const ModelConfig& c, std::vector<float>& cos_t, std::vector<float>& sin_t) {
  const int64_t hd = c.head_dim(), half = hd / 2;
  cos_t.resize(size_t(c.context * half));
  sin_t.resize(size_t(c.context * half));
  for (int64_t t = 0; t < c.context; ++t)
    for (int64_t i = 0; i < half; ++i) {
      const double angle = double(t) * std::pow(c.rope_theta, -2.0 * double(i) / double(hd));
      cos_t[size_t(t * half + i)] = float(std::cos(angle));
      sin_t[size_t(t * half + i)] = float(std::sin(angle));
    }
}

void Model::declare_parameters(const ModelConfig& c, ParamTable& table) {
  const int64_t D = c.dim, hd = c.head_dim(), F = c.hidden(), V = c.vocab_size;
  const int64_t qdim = c.n_heads * hd, kvdim = c.kv_heads() * hd;
  table.add("tok_emb", {V, D}, ParamGroup::embedding);
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const std::string p = cat("blocks.", l, ".");
    table.add(p + "attn_norm", {D}, ParamGroup::norm);
    table.add(p + "wq", {qdim, D}, ParamGroup::block_matrix);
    table.add(p + "wk", {kvdim, D}, ParamGroup::block_matrix);
    table.add(p + "wv", {kvdim, D}, ParamGroup::block_matrix);
    if (c.subln) table.add(p + "attn_sub_norm", {qdim}, ParamGroup::norm);
    table.add(p + "wo", {D, qdim}, ParamGroup::block_matrix);
    table.add(p + "ffn_norm", {D}, ParamGroup::norm);
    if (c.ffn == ModelConfig::Ffn::swiglu) table.add(p + "w_gate", {F, D}, ParamGroup::block_matrix);
    table.add(p + "w_up", {F, D}, ParamGroup::block_matrix);
    if (c.subln) table.add(p + "ffn_sub_norm", {F}, ParamGroup::norm);
    table.add(p + "w_down", {D, F}, ParamGroup::block_matrix);
  }
  table.add("final_norm", {D}, ParamGroup::norm);
  if (!c.tied_embeddings) table.add("head", {V, D}, ParamGroup::head);
}

Model::Model(const ModelConfig& config, Dispatcher& dispatcher, uint64_t seed) : config_(config), d_(dispatcher) {
  config_.validate();
  declare_parameters(config_, table_);
  table_.allocate();

  tok_emb_ = &table_.slice("tok_emb");
  final_norm_ = &table_.slice("final_norm");
  head_ = config_.tied_embeddings ? tok_emb_ : &table_.slice("head");
  for (int64_t l = 0; l < config_.n_layers; ++l) {
    const std::string p = cat("blocks.", l, ".");
    Block b;
    b.attn_norm = &table_.slice(p + "attn_norm");
    b.ffn_norm = &table_.slice(p + "ffn_norm");
    if (config_.subln) b.attn_sub_norm = &table_.slice(p + "attn_sub_norm"), b.ffn_sub_norm = &table_.slice(p + "ffn_sub_norm");
    b.wq.weight = &table_.slice(p + "wq");
    b.wk.weight = &table_.slice(p + "wk");
    b.wv.weight = &table_.slice(p + "wv");
    b.wo.weight = &table_.slice(p + "wo");
    if (config_.ffn == ModelConfig::Ffn::swiglu) b.w_gate.weight = &table_.slice(p + "w_gate");
    b.w_up.weight = &table_.slice(p + "w_up");
    b.w_down.weight = &table_.slice(p + "w_down");
    blocks_.push_back(std::move(b));
  }

  // Initialisation: N(0, 0.02), output projections of the residual branches scaled by
  // 1 / sqrt(2 n_layers) (GPT-2), norm gains 1; one generator walked in table order.
  Rng rng(seed, 0x494e4954);  // "INIT"
  for (const auto& s : table_.slices()) {
    float* p = table_.param(s).data<float>();
    const bool residual_out = s.name.ends_with(".wo") || s.name.ends_with(".w_down");
    const float std_dev = residual_out ? float(0.02 / std::sqrt(2.0 * double(config_.n_layers))) : 0.02f;
    for (int64_t i = 0; i < s.numel; ++i) p[i] = s.group == ParamGroup::norm ? 1.0f : std_dev * rng.normal();
  }

  rope_tables(config_, rope_cos_, rope_sin_);
}

// The weights a BitLinear multiplies by: q * s from the absmean quantizer, or the latent weights.
void Model::quantize_weight(Linear& l) {
  Tensor w = table_.param(*l.weight);
  if (config_.quant == ModelConfig::Quant::none) {
    l.w_tilde = w;
    return;
  }
  Tensor q = scratch_view(scratch_.q8, w.shape(), DType::i8);
  const float s = d_.quantize_ternary(w, q);
  ensure(l.w_tilde, w.shape());
  const int8_t* qp = q.data<int8_t>();
  float* out = l.w_tilde.data<float>();
  kernels::for_elements(d_, w.numel(), [&](int64_t i0, int64_t i1) { kernels::dequantize_ternary(qp, s, out, i0, i1); });
}

void Model::quantize_activations(const Tensor& x, Tensor& out) {
  if (config_.quant == ModelConfig::Quant::none) {
    out = x;
    return;
  }
  const int64_t rows = as_matrix(x).first, cols = as_matrix(x).second;  // (clang 14 cannot capture structured bindings)
  Tensor q = scratch_view(scratch_.q8, {rows, cols}, DType::i8);
  Tensor s = scratch_view(scratch_.q8_scales, {rows}, DType::f32);
  d_.quantize_int8_rows(x, q, s);
  ensure(out, x.shape());
  const int8_t* qp = q.data<int8_t>();
  const float* sp = s.data<float>();
  float* o = out.data<float>();
  kernels::for_rows(d_, rows, cols, [&](int64_t r0, int64_t r1) { kernels::dequantize_int8_rows(qp, sp, o, r0, r1, cols); });
}

// y = x~ W~^T, or y += ... (the residual add, fused into the GEMM's beta).
void Model::linear_forward(const Tensor& x_tilde, Linear& l, Tensor& y, bool accumulate) {
  d_.matmul(x_tilde, l.w_tilde, y, {false, true, 1.0f, accumulate ? 1.0f : 0.0f});
}

// Straight-through: the quantizers pass gradients unchanged, so dW = dy^T x~, dx = dy W~.
void Model::linear_backward(const Tensor& dy, const Tensor& x_tilde, const Linear& l, Tensor* dx, bool accumulate_dx) {
  Tensor dw = table_.grad(*l.weight);
  d_.matmul(dy, x_tilde, dw, {true, false, 1.0f, 1.0f});
  if (dx) d_.matmul(dy, l.w_tilde, *dx, {false, false, 1.0f, accumulate_dx ? 1.0f : 0.0f});
}

void Model::rmsnorm(const Tensor& x, const ParamSlice& gain, Tensor& y, Tensor& rinv) {
  const int64_t n = as_matrix(x).first, d = as_matrix(x).second;
  ensure_matrix(y, n, d);
  ensure(rinv, {n});
  const float* xp = x.data<float>();
  const float* g = table_.param(gain).data<float>();
  float *yp = y.data<float>(), *rp = rinv.data<float>();
  const double eps = config_.norm_eps;
  kernels::for_rows(d_, n, d, [&](int64_t r0, int64_t r1) { kernels::rmsnorm_rows(xp, g, yp, rp, r0, r1, d, eps); });
}

void Model::rmsnorm_backward(const Tensor& dy, const Tensor& x, const ParamSlice& gain, const Tensor& rinv, const Tensor* residual, Tensor& dx) {
  const int64_t n = as_matrix(x).first, d = as_matrix(x).second;
  ensure_matrix(dx, n, d);
  const float *dyp = dy.data<float>(), *xp = x.data<float>(), *rp = rinv.data<float>(), *g = table_.param(gain).data<float>();
  const float* res = residual ? residual->data<float>() : nullptr;
  float* dxp = dx.data<float>();
  float* dg = table_.grad(gain).data<float>();
  kernels::for_rows(d_, n, d, [&](int64_t r0, int64_t r1) { kernels::rmsnorm_backward_rows(dyp, xp, g, rp, res, dxp, r0, r1, d); });
  kernels::for_columns(d_, d, [&](int64_t j0, int64_t j1) { kernels::rmsnorm_gain_grad_cols(dyp, xp, rp, dg, n, d, j0, j1); });
}

void Model::rope(Tensor& x, int64_t heads, float sign) {
  const int64_t n = x.dim(0), hd = config_.head_dim(), seq = seq_;
  float* p = x.data<float>();
  const float *c = rope_cos_.data(), *s = rope_sin_.data();
  kernels::for_rows(d_, n, heads * hd, [&](int64_t r0, int64_t r1) { kernels::rope_rows(p, r0, r1, heads, hd, seq, c, s, sign); });
}

AttentionShape Model::attention_shape() const {
  const int64_t hd = config_.head_dim();
  return {batch_, seq_, config_.n_heads, config_.kv_heads(), hd, float(1.0 / std::sqrt(double(hd)))};
}

void Model::attention_sublayer(Block& b, const BlockActivations& r, AttentionActivations& a) {
  const int64_t N = batch_ * seq_, H = config_.n_heads, KV = config_.kv_heads(), hd = config_.head_dim();
  ensure_matrix(a.q, N, H * hd), ensure_matrix(a.k, N, KV * hd), ensure_matrix(a.v, N, KV * hd);
  linear_forward(r.h1_tilde, b.wq, a.q);
  linear_forward(r.h1_tilde, b.wk, a.k);
  linear_forward(r.h1_tilde, b.wv, a.v);
  rope(a.q, H, 1.0f);
  rope(a.k, KV, 1.0f);
  ensure_matrix(a.att, N, H * hd), ensure(a.lse, {batch_, H, seq_});
  d_.attention_forward(a.q, a.k, a.v, attention_shape(), a.att, a.lse);
  if (config_.subln) rmsnorm(a.att, *b.attn_sub_norm, a.att_normed, a.att_rinv);
  else a.att_normed = a.att;
  quantize_activations(a.att_normed, a.att_tilde);
}

// The FFN sublayer from x_mid (N, D): h2 = norm(x_mid) (N, D), quantized; up (N, F) = h2 w_up^T
// (and gate for SwiGLU); ffn_act (N, F) = swiglu(gate, up) or relu(up)^2; SubLN; quantized into f_tilde.
void Model::ffn_sublayer(Block& b, BlockActivations& r) {
  const int64_t N = batch_ * seq_, F = config_.hidden();
  rmsnorm(r.x_mid, *b.ffn_norm, r.h2, r.h2_rinv);
  quantize_activations(r.h2, r.h2_tilde);
  ensure_matrix(r.up, N, F), ensure_matrix(r.ffn_act, N, F);
  linear_forward(r.h2_tilde, b.w_up, r.up);
  const float* up = r.up.data<float>();
  float* f = r.ffn_act.data<float>();
  if (config_.ffn == ModelConfig::Ffn::swiglu) {
    ensure_matrix(r.gate, N, F);
    linear_forward(r.h2_tilde, b.w_gate, r.gate);
    const float* gate = r.gate.data<float>();
    kernels::for_elements(d_, N * F, [&](int64_t i0, int64_t i1) { kernels::swiglu(gate, up, f, i0, i1); });
  } else {
    kernels::for_elements(d_, N * F, [&](int64_t i0, int64_t i1) { kernels::relu2(up, f, i0, i1); });
  }
  if (config_.subln) rmsnorm(r.ffn_act, *b.ffn_sub_norm, r.f_normed, r.f_rinv);
  else r.f_normed = r.ffn_act;
  quantize_activations(r.f_normed, r.f_tilde);
}

// x_mid = x_in + wo(attention(norm(x_in))); x_out = x_mid + w_down(ffn(norm(x_mid))), all (N, D).
// The weights were quantized by this step's forward (Linear::w_tilde), so a recomputation reuses them.
void Model::block_forward(Block& b, bool write_output) {
  const int64_t N = batch_ * seq_, D = config_.dim;
  BlockActivations& r = block_activations(b);
  AttentionActivations& a = attention_activations(b);
  rmsnorm(b.x_in, *b.attn_norm, r.h1, r.h1_rinv);
  quantize_activations(r.h1, r.h1_tilde);
  attention_sublayer(b, r, a);
  ensure_matrix(r.x_mid, N, D);
  std::memcpy(r.x_mid.data<float>(), b.x_in.data<float>(), size_t(N * D) * sizeof(float));
  linear_forward(a.att_tilde, b.wo, r.x_mid, true);  // the residual add fused into the GEMM (beta 1)
  ffn_sublayer(b, r);
  if (!write_output) return;
  ensure_matrix(b.x_out, N, D);
  std::memcpy(b.x_out.data<float>(), r.x_mid.data<float>(), size_t(N * D) * sizeof(float));
  linear_forward(r.f_tilde, b.w_down, b.x_out, true);
}

int64_t Model::parameter_count(const ModelConfig& c) {
  ParamTable table;  // declared, never allocated
  declare_parameters(c, table);
  return table.numel();
}

double Model::activation_bytes(const ModelConfig& config, Recompute recompute, int64_t batch, int64_t seq) {
  const double N = double(batch * seq), D = double(config.dim), F = double(config.hidden()), V = double(config.vocab_size);
  const double Q = double(config.n_heads * config.head_dim()), KV = double(config.kv_heads() * config.head_dim());
  const bool quant = config.quant == ModelConfig::Quant::ternary;
  const bool swiglu = config.ffn == ModelConfig::Ffn::swiglu;
  // Floats per token of each group (the _tilde copies exist only when quantizing).
  const double attn = Q + 2 * KV + Q + (config.subln ? Q : 0) + (quant ? Q : 0);
  const double rest = D * (quant ? 2 : 1) + D + D * (quant ? 2 : 1) + F * (swiglu ? 3 : 2) + (config.subln ? F : 0) + (quant ? F : 0);
  const double layers = double(config.n_layers);
  const double kept = recompute == Recompute::block ? layers * 2 * D + attn + rest
                      : recompute == Recompute::attention ? layers * (2 * D + rest) + attn
                                                           : layers * (2 * D + rest + attn);
  const double head = D + D + V * 2 + 2 * D;  // embedding, final norm, logits and their gradient
  const double backward = 2 * F * (swiglu ? 2 : 1) + 4 * D + 2 * Q + 2 * KV;  // the backward's scratch, reused per block
  return 4.0 * N * (kept + head + backward);
}

double Model::forward(const int32_t* tokens, const int32_t* targets, int64_t batch, int64_t seq) {
  if (batch <= 0 || seq <= 0) fail(ErrorKind::invalid_argument, "forward: batch and sequence length must be positive, got ", batch, " and ", seq);
  if (seq > config_.context) fail(ErrorKind::invalid_argument, "forward: sequence length ", seq, " exceeds model.context (", config_.context, ")");
  const int64_t N = batch * seq, V = config_.vocab_size;
  for (int64_t i = 0; i < N; ++i) {
    if (tokens[i] < 0 || tokens[i] >= V) fail(ErrorKind::invalid_argument, "forward: token ", tokens[i], " at position ", i, " is outside [0, ", V, ")");
    if (targets[i] < 0 || targets[i] >= V) fail(ErrorKind::invalid_argument, "forward: target ", targets[i], " at position ", i, " is outside [0, ", V, ")");
  }
  tokens_.assign(tokens, tokens + N);
  targets_.assign(targets, targets + N);
  batch_ = batch, seq_ = seq;

  embedding_forward();  // x_embed (N, D)
  // This step's BitLinear weights, once: every block forward (and a recomputation) reads them.
  for (Block& b : blocks_)
    for (Linear* l : {&b.wq, &b.wk, &b.wv, &b.wo, &b.w_up, &b.w_down})
      quantize_weight(*l);
  if (config_.ffn == ModelConfig::Ffn::swiglu)
    for (Block& b : blocks_) quantize_weight(b.w_gate);
  Tensor x = x_embed;
  for (Block& b : blocks_) {
    b.x_in = x;
    block_forward(b, true);
    x = b.x_out;
  }
  return head_forward(x);
}

// x_embed (N, D) = tok_emb[tokens].
void Model::embedding_forward() {
  const int64_t N = batch_ * seq_, D = config_.dim;
  ensure_matrix(x_embed, N, D);
  const float* emb = table_.param(*tok_emb_).data<float>();
  float* x = x_embed.data<float>();
  kernels::for_rows(d_, N, D, [&](int64_t r0, int64_t r1) { kernels::embedding_rows(emb, tokens_.data(), x, r0, r1, D); });
}

// xf (N, D) = norm(x); logits (N, V) = xf head^T; the mean cross-entropy from each row's
// log-sum-exp (no probability matrix kept).
double Model::head_forward(const Tensor& x) {
  const int64_t N = batch_ * seq_, V = config_.vocab_size;
  rmsnorm(x, *final_norm_, xf, xf_rinv);
  ensure_matrix(logits_, N, V);
  d_.matmul(xf, table_.param(*head_), logits_, {false, true, 1.0f, 0.0f});
  row_lse_.resize(size_t(N));
  row_loss_.resize(size_t(N));
  const float* lg = logits_.data<float>();
  kernels::for_rows(d_, N, V, [&](int64_t r0, int64_t r1) {
    kernels::cross_entropy_rows(lg, targets_.data(), row_lse_.data(), row_loss_.data(), r0, r1, V);
  });
  double loss = 0;
  for (double l : row_loss_) loss += l;  // in row order: the same sum every time
  return loss / double(N);
}

std::vector<std::pair<int64_t, int64_t>> Model::gradient_ranges() const {
  std::vector<std::pair<int64_t, int64_t>> ranges{{final_norm_->offset, table_.numel() - final_norm_->offset}};
  for (size_t l = blocks_.size(); l-- > 0;) {
    const int64_t end = l + 1 == blocks_.size() ? final_norm_->offset : blocks_[l + 1].attn_norm->offset;
    ranges.push_back({blocks_[l].attn_norm->offset, end - blocks_[l].attn_norm->offset});
  }
  ranges.push_back({0, blocks_.empty() ? final_norm_->offset : blocks_.front().attn_norm->offset});
  return ranges;
}

void Model::backward(float loss_scale, const GradientsReady& ready) {
  if (tokens_.empty()) fail(ErrorKind::invalid_argument, "backward() before forward()");
  // gradient_ranges() in order: the tail (final norm, head) now, each block after its backward, the embedding last.
  const std::vector<std::pair<int64_t, int64_t>> ranges = ready ? gradient_ranges() : std::vector<std::pair<int64_t, int64_t>>{};
  size_t handed_over = 0;
  auto hand_over = [&] {
    if (!ready) return;
    ready(ranges[handed_over].first, ranges[handed_over].second);
    ++handed_over;
  };
  head_backward(loss_scale);  // scratch_.dx: the gradient of the last block's output
  hand_over();
  for (auto it = blocks_.rbegin(); it != blocks_.rend(); ++it) {
    Block& b = *it;
    if (recompute_ == Recompute::block) block_forward(b, false);  // refills the shared buffers, same bits
    ffn_backward(b);        // scratch_.dx (grad of x_out) -> scratch_.dx_mid
    attention_backward(b);  // scratch_.dx_mid -> scratch_.dx (grad of x_in: the block below's x_out)
    hand_over();
  }
  embedding_backward();
  hand_over();
}

// dlogits (N, V) = (softmax - onehot) * loss_scale / N, from the forward's log-sum-exp;
// dhead (V, D) += dlogits^T xf; dxf (N, D) = dlogits head; dx (N, D) = the final norm's backward.
void Model::head_backward(float loss_scale) {
  const int64_t N = batch_ * seq_, D = config_.dim, V = config_.vocab_size;
  Scratch& s = scratch_;
  Tensor& dlogits = ensure_matrix(s.dlogits, N, V);
  const float inv_n = float(double(loss_scale) / double(N));
  const float* lg = logits_.data<float>();
  float* dl = dlogits.data<float>();
  kernels::for_rows(d_, N, V, [&](int64_t r0, int64_t r1) {
    kernels::cross_entropy_backward_rows(lg, targets_.data(), row_lse_.data(), inv_n, dl, r0, r1, V);
  });
  Tensor dhead = table_.grad(*head_);
  d_.matmul(dlogits, xf, dhead, {true, false, 1.0f, 1.0f});
  ensure_matrix(s.dxf, N, D);
  d_.matmul(dlogits, table_.param(*head_), s.dxf, {false, false, 1.0f, 0.0f});
  const Tensor& x_last = blocks_.empty() ? x_embed : blocks_.back().x_out;
  rmsnorm_backward(s.dxf, x_last, *final_norm_, xf_rinv, nullptr, s.dx);
}

// The FFN branch of x_out = x_mid + w_down(ffn_act): from dx (N, D), the gradient of x_out, through
// w_down (df (N, F)), SubLN, SwiGLU or relu^2 (dgate, dup (N, F)), w_gate and w_up (dh (N, D)),
// and the FFN norm; dx_mid (N, D) = that plus the residual path's dx.
void Model::ffn_backward(Block& b) {
  const int64_t N = batch_ * seq_, D = config_.dim, F = config_.hidden();
  Scratch& s = scratch_;
  BlockActivations& r = block_activations(b);
  ensure_matrix(s.df_normed, N, F);
  linear_backward(s.dx, r.f_tilde, b.w_down, &s.df_normed, false);
  Tensor* df = &s.df_normed;
  if (config_.subln) {
    rmsnorm_backward(s.df_normed, r.ffn_act, *b.ffn_sub_norm, r.f_rinv, nullptr, s.df);
    df = &s.df;
  }
  ensure_matrix(s.dup, N, F);
  ensure_matrix(s.dh, N, D);
  const float *dfp = df->data<float>(), *up = r.up.data<float>();
  float* dup = s.dup.data<float>();
  if (config_.ffn == ModelConfig::Ffn::swiglu) {
    ensure_matrix(s.dgate, N, F);
    const float* gate = r.gate.data<float>();
    float* dgate = s.dgate.data<float>();
    kernels::for_elements(d_, N * F, [&](int64_t i0, int64_t i1) { kernels::swiglu_backward(gate, up, dfp, dgate, dup, i0, i1); });
    linear_backward(s.dgate, r.h2_tilde, b.w_gate, &s.dh, false);
    linear_backward(s.dup, r.h2_tilde, b.w_up, &s.dh, true);
  } else {
    kernels::for_elements(d_, N * F, [&](int64_t i0, int64_t i1) { kernels::relu2_backward(up, dfp, dup, i0, i1); });
    linear_backward(s.dup, r.h2_tilde, b.w_up, &s.dh, false);
  }
  rmsnorm_backward(s.dh, r.x_mid, *b.ffn_norm, r.h2_rinv, &s.dx, s.dx_mid);
}

// The attention branch of x_mid = x_in + wo(att): from dx_mid (N, D) through wo (datt (N, H hd)),
// SubLN, the attention op's backward (dq (N, H hd), dk, dv (N, KV hd)), inverse RoPE, wq/wk/wv
// (dh (N, D)) and the attention norm; dx (N, D) = that plus the residual path's dx_mid.
void Model::attention_backward(Block& b) {
  const int64_t N = batch_ * seq_, H = config_.n_heads, KV = config_.kv_heads(), hd = config_.head_dim();
  Scratch& s = scratch_;
  BlockActivations& r = block_activations(b);
  AttentionActivations& a = attention_activations(b);
  if (recompute_ == Recompute::attention) attention_sublayer(b, r, a);  // refills the shared buffers, same bits
  ensure_matrix(s.datt_normed, N, H * hd);
  linear_backward(s.dx_mid, a.att_tilde, b.wo, &s.datt_normed, false);
  Tensor* datt = &s.datt_normed;
  if (config_.subln) {
    rmsnorm_backward(s.datt_normed, a.att, *b.attn_sub_norm, a.att_rinv, nullptr, s.datt);
    datt = &s.datt;
  }
  ensure_matrix(s.dq, N, H * hd), ensure_matrix(s.dk, N, KV * hd), ensure_matrix(s.dv, N, KV * hd);
  d_.attention_backward(a.q, a.k, a.v, a.att, *datt, a.lse, attention_shape(), s.dq, s.dk, s.dv);
  rope(s.dq, H, -1.0f);
  rope(s.dk, KV, -1.0f);
  linear_backward(s.dq, r.h1_tilde, b.wq, &s.dh, false);
  linear_backward(s.dk, r.h1_tilde, b.wk, &s.dh, true);
  linear_backward(s.dv, r.h1_tilde, b.wv, &s.dh, true);
  rmsnorm_backward(s.dh, b.x_in, *b.attn_norm, r.h1_rinv, &s.dx_mid, s.dx);
}

// dtok_emb[tokens[i]] += dx[i], rows in token order per column slice (deterministic accumulation).
void Model::embedding_backward() {
  const int64_t N = batch_ * seq_, D = config_.dim;
  float* demb = table_.grad(*tok_emb_).data<float>();
  const float* dx = scratch_.dx.data<float>();
  kernels::for_columns(d_, D, [&](int64_t j0, int64_t j1) { kernels::embedding_grad_cols(dx, tokens_.data(), demb, N, D, j0, j1); });
}

}  // namespace hybrit
