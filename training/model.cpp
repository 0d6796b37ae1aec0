#include "training/model.hpp"

#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/rng.hpp"

namespace hybrit {

int64_t ModelConfig::hidden() const {
  if (ffn_hidden > 0) return ffn_hidden;
  const int64_t h = ffn == Ffn::swiglu ? (8 * dim + 2) / 3 : 4 * dim;
  return (h + 31) / 32 * 32;
}

void ModelConfig::validate() const {
  auto positive = [](int64_t v, const char* key) {
    if (v <= 0) fail(ErrorKind::invalid_argument, "model.", key, " must be positive, got ", v);
  };
  positive(vocab_size, "vocab_size");
  positive(dim, "dim");
  positive(n_layers, "n_layers");
  positive(n_heads, "n_heads");
  if (n_kv_heads < 0) fail(ErrorKind::invalid_argument, "model.n_kv_heads must be positive (or 0: as many as n_heads), got ", n_kv_heads);
  positive(context, "context");
  if (ffn_hidden < 0) fail(ErrorKind::invalid_argument, "model.ffn_hidden must be positive (or 0 for the default), got ", ffn_hidden);
  if (dim % n_heads) fail(ErrorKind::invalid_argument, "model.dim (", dim, ") must be divisible by model.n_heads (", n_heads, ")");
  if (n_heads % kv_heads())
    fail(ErrorKind::invalid_argument, "model.n_heads (", n_heads, ") must be divisible by model.n_kv_heads (", kv_heads(), ")");
  if (head_dim() % 2) fail(ErrorKind::invalid_argument, "model.dim / model.n_heads = ", head_dim(), " must be even (RoPE rotates pairs)");
  if (!(rope_theta > 0)) fail(ErrorKind::invalid_argument, "model.rope_theta must be positive, got ", rope_theta);
  if (!(norm_eps > 0)) fail(ErrorKind::invalid_argument, "model.norm_eps must be positive, got ", norm_eps);
}

namespace {

// dx = rinv (dy g) - x rinv^3 mean(dy g x); dg += sum over rows of dy x rinv (in row order).
void rmsnorm_backward(const float* dy, const float* x, const float* g, const float* rinv, float* dx, float* dg, int64_t n, int64_t d) {
  tbb::parallel_for(int64_t(0), n, [&](int64_t r) {
    const float* dyr = dy + r * d;
    const float* xr = x + r * d;
    double dot = 0;
    for (int64_t j = 0; j < d; ++j) dot += double(dyr[j]) * g[j] * xr[j];
    const float ri = rinv[r], coeff = float(double(ri) * ri * ri * dot / double(d));
    for (int64_t j = 0; j < d; ++j) dx[r * d + j] = ri * dyr[j] * g[j] - xr[j] * coeff;
  });
  for (int64_t r = 0; r < n; ++r)
    for (int64_t j = 0; j < d; ++j) dg[j] += dy[r * d + j] * x[r * d + j] * rinv[r];
}

// RoPE, half-split pairs (i, i + hd/2) as in HF Llama, in place; `sign` = -1 applies the inverse
// rotation (the backward of a rotation is its transpose).
void rope(float* x, int64_t rows, int64_t heads, int64_t hd, int64_t seq, const float* cos_t, const float* sin_t, float sign) {
  const int64_t half = hd / 2;
  tbb::parallel_for(int64_t(0), rows, [&](int64_t r) {
    const int64_t t = r % seq;
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + (r * heads + h) * hd;
      for (int64_t i = 0; i < half; ++i) {
        const float c = cos_t[t * half + i], s = sign * sin_t[t * half + i], a = v[i], b = v[i + half];
        v[i] = a * c - b * s;
        v[i + half] = a * s + b * c;
      }
    }
  });
}

Tensor matrix(int64_t rows, int64_t cols) { return Tensor::zeros({rows, cols}, DType::f32); }

}  // namespace

// y = x / sqrt(mean(x^2) + eps) * g, row by row; rinv keeps 1 / sqrt(...) for backward.
void rmsnorm_forward(const float* x, const float* g, float* y, float* rinv, int64_t n, int64_t d, double eps) {
  tbb::parallel_for(int64_t(0), n, [&](int64_t r) {
    const float* xr = x + r * d;
    double ss = 0;
    for (int64_t j = 0; j < d; ++j) ss += double(xr[j]) * xr[j];
    const float ri = float(1.0 / std::sqrt(ss / double(d) + eps));
    if (rinv) rinv[r] = ri;
    for (int64_t j = 0; j < d; ++j) y[r * d + j] = xr[j] * ri * g[j];
  });
}

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

Model::Model(const ModelConfig& config, Dispatcher& dispatcher, uint64_t seed) : config_(config), d_(dispatcher) {
  config_.validate();
  const int64_t D = config_.dim, hd = config_.head_dim(), F = config_.hidden(), V = config_.vocab_size;
  const int64_t qdim = config_.n_heads * hd, kvdim = config_.kv_heads() * hd;
  table_.add("tok_emb", {V, D}, ParamGroup::embedding);
  for (int64_t l = 0; l < config_.n_layers; ++l) {
    const std::string p = cat("blocks.", l, ".");
    table_.add(p + "attn_norm", {D}, ParamGroup::norm);
    table_.add(p + "wq", {qdim, D}, ParamGroup::block_matrix);
    table_.add(p + "wk", {kvdim, D}, ParamGroup::block_matrix);
    table_.add(p + "wv", {kvdim, D}, ParamGroup::block_matrix);
    if (config_.subln) table_.add(p + "attn_sub_norm", {qdim}, ParamGroup::norm);
    table_.add(p + "wo", {D, qdim}, ParamGroup::block_matrix);
    table_.add(p + "ffn_norm", {D}, ParamGroup::norm);
    if (config_.ffn == ModelConfig::Ffn::swiglu) table_.add(p + "w_gate", {F, D}, ParamGroup::block_matrix);
    table_.add(p + "w_up", {F, D}, ParamGroup::block_matrix);
    if (config_.subln) table_.add(p + "ffn_sub_norm", {F}, ParamGroup::norm);
    table_.add(p + "w_down", {D, F}, ParamGroup::block_matrix);
  }
  table_.add("final_norm", {D}, ParamGroup::norm);
  if (!config_.tied_embeddings) table_.add("head", {V, D}, ParamGroup::head);
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
    l.w_used = w;
    return;
  }
  Tensor q = Tensor::empty(w.shape(), DType::i8);
  const float s = d_.quantize_ternary(w, q);
  l.w_used = Tensor::empty(w.shape(), DType::f32);
  float* out = l.w_used.data<float>();
  const int8_t* qp = q.data<int8_t>();
  for (int64_t i = 0; i < w.numel(); ++i) out[i] = float(qp[i]) * s;
}

// The activations a BitLinear multiplies: q / s per row from the absmax quantizer, or x itself.
Tensor Model::quantize_activations(const Tensor& x) {
  if (config_.quant == ModelConfig::Quant::none) return x;
  const auto [rows, cols] = as_matrix(x);
  Tensor q = Tensor::empty(x.shape(), DType::i8), s = Tensor::empty({rows}, DType::f32);
  d_.quantize_int8_rows(x, q, s);
  Tensor out = Tensor::empty(x.shape(), DType::f32);
  const int8_t* qp = q.data<int8_t>();
  const float* sp = s.data<float>();
  float* o = out.data<float>();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) o[r * cols + c] = float(qp[r * cols + c]) / sp[r];
  return out;
}

void Model::linear_forward(const Tensor& x_used, Linear& l, Tensor& y) { d_.matmul(x_used, l.w_used, y, {false, true, 1.0f, 0.0f}); }

// Straight-through: the quantizers pass gradients unchanged, so dW = dy^T x_used, dx = dy W_used.
void Model::linear_backward(const Tensor& dy, const Tensor& x_used, const Linear& l, Tensor* dx, bool accumulate_dx) {
  Tensor dw = table_.grad(*l.weight);
  d_.matmul(dy, x_used, dw, {true, false, 1.0f, 1.0f});
  if (dx) d_.matmul(dy, l.w_used, *dx, {false, false, 1.0f, accumulate_dx ? 1.0f : 0.0f});
}

double Model::forward(const int32_t* tokens, const int32_t* targets, int64_t batch, int64_t seq) {
  if (batch <= 0 || seq <= 0) fail(ErrorKind::invalid_argument, "forward: batch and sequence length must be positive, got ", batch, " and ", seq);
  if (seq > config_.context) fail(ErrorKind::invalid_argument, "forward: sequence length ", seq, " exceeds model.context (", config_.context, ")");
  const int64_t N = batch * seq, D = config_.dim, V = config_.vocab_size, H = config_.n_heads, KV = config_.kv_heads();
  const int64_t hd = config_.head_dim(), F = config_.hidden(), group = H / KV;
  for (int64_t i = 0; i < N; ++i) {
    if (tokens[i] < 0 || tokens[i] >= V) fail(ErrorKind::invalid_argument, "forward: token ", tokens[i], " at position ", i, " is outside [0, ", V, ")");
    if (targets[i] < 0 || targets[i] >= V) fail(ErrorKind::invalid_argument, "forward: target ", targets[i], " at position ", i, " is outside [0, ", V, ")");
  }
  tokens_.assign(tokens, tokens + N);
  targets_.assign(targets, targets + N);
  batch_ = batch, seq_ = seq;
  const float scale = float(1.0 / std::sqrt(double(hd)));

  Tensor x = matrix(N, D);
  const float* emb = table_.param(*tok_emb_).data<float>();
  for (int64_t r = 0; r < N; ++r) std::memcpy(x.data<float>() + r * D, emb + int64_t(tokens[r]) * D, size_t(D) * sizeof(float));

  for (Block& b : blocks_) {
    b.x_in = x;
    b.h1 = matrix(N, D), b.h1_rinv = Tensor::empty({N}, DType::f32);
    rmsnorm_forward(x.data<float>(), table_.param(*b.attn_norm).data<float>(), b.h1.data<float>(), b.h1_rinv.data<float>(), N, D, config_.norm_eps);
    b.h1_used = quantize_activations(b.h1);
    for (Linear* l : {&b.wq, &b.wk, &b.wv}) quantize_weight(*l);
    b.q = matrix(N, H * hd), b.k = matrix(N, KV * hd), b.v = matrix(N, KV * hd);
    linear_forward(b.h1_used, b.wq, b.q);
    linear_forward(b.h1_used, b.wk, b.k);
    linear_forward(b.h1_used, b.wv, b.v);
    rope(b.q.data<float>(), N, H, hd, seq, rope_cos_.data(), rope_sin_.data(), 1.0f);
    rope(b.k.data<float>(), N, KV, hd, seq, rope_cos_.data(), rope_sin_.data(), 1.0f);

    // Causal softmax attention, each query head reading the key/value head of its group.
    b.probs = Tensor::zeros({batch, H, seq, seq}, DType::f32);
    b.att = matrix(N, H * hd);
    const float *q = b.q.data<float>(), *k = b.k.data<float>(), *v = b.v.data<float>();
    float *probs = b.probs.data<float>(), *att = b.att.data<float>();
    tbb::parallel_for(int64_t(0), batch * H, [&](int64_t bh) {
      const int64_t bi = bh / H, h = bh % H, g = h / group;
      for (int64_t t = 0; t < seq; ++t) {
        float* p = probs + (bh * seq + t) * seq;
        const float* qt = q + (bi * seq + t) * H * hd + h * hd;
        float m = -INFINITY;
        for (int64_t s = 0; s <= t; ++s) {
          const float* ks = k + (bi * seq + s) * KV * hd + g * hd;
          float dot = 0;
          for (int64_t c = 0; c < hd; ++c) dot += qt[c] * ks[c];
          p[s] = dot * scale;
          m = std::max(m, p[s]);
        }
        double sum = 0;
        for (int64_t s = 0; s <= t; ++s) sum += (p[s] = std::exp(p[s] - m));
        const float inv = float(1.0 / sum);
        float* out = att + (bi * seq + t) * H * hd + h * hd;
        for (int64_t s = 0; s <= t; ++s) {
          p[s] *= inv;
          const float* vs = v + (bi * seq + s) * KV * hd + g * hd;
          for (int64_t c = 0; c < hd; ++c) out[c] += p[s] * vs[c];
        }
      }
    });
    if (config_.subln) {
      b.att_normed = matrix(N, H * hd), b.att_rinv = Tensor::empty({N}, DType::f32);
      rmsnorm_forward(b.att.data<float>(), table_.param(*b.attn_sub_norm).data<float>(), b.att_normed.data<float>(), b.att_rinv.data<float>(), N,
                      H * hd, config_.norm_eps);
    } else {
      b.att_normed = b.att;
    }
    b.att_used = quantize_activations(b.att_normed);
    quantize_weight(b.wo);
    Tensor a = matrix(N, D);
    linear_forward(b.att_used, b.wo, a);
    b.x_mid = matrix(N, D);
    for (int64_t i = 0; i < N * D; ++i) b.x_mid.data<float>()[i] = x.data<float>()[i] + a.data<float>()[i];

    b.h2 = matrix(N, D), b.h2_rinv = Tensor::empty({N}, DType::f32);
    rmsnorm_forward(b.x_mid.data<float>(), table_.param(*b.ffn_norm).data<float>(), b.h2.data<float>(), b.h2_rinv.data<float>(), N, D,
                    config_.norm_eps);
    b.h2_used = quantize_activations(b.h2);
    b.up = matrix(N, F), b.f = matrix(N, F);
    quantize_weight(b.w_up);
    linear_forward(b.h2_used, b.w_up, b.up);
    const float* up = b.up.data<float>();
    float* f = b.f.data<float>();
    if (config_.ffn == ModelConfig::Ffn::swiglu) {
      b.gate = matrix(N, F);
      quantize_weight(b.w_gate);
      linear_forward(b.h2_used, b.w_gate, b.gate);
      const float* gate = b.gate.data<float>();
      for (int64_t i = 0; i < N * F; ++i) f[i] = silu(gate[i]) * up[i];
    } else {
      for (int64_t i = 0; i < N * F; ++i) f[i] = up[i] > 0 ? up[i] * up[i] : 0.0f;
    }
    if (config_.subln) {
      b.f_normed = matrix(N, F), b.f_rinv = Tensor::empty({N}, DType::f32);
      rmsnorm_forward(f, table_.param(*b.ffn_sub_norm).data<float>(), b.f_normed.data<float>(), b.f_rinv.data<float>(), N, F, config_.norm_eps);
    } else {
      b.f_normed = b.f;
    }
    b.f_used = quantize_activations(b.f_normed);
    quantize_weight(b.w_down);
    Tensor m = matrix(N, D);
    linear_forward(b.f_used, b.w_down, m);
    x = matrix(N, D);
    for (int64_t i = 0; i < N * D; ++i) x.data<float>()[i] = b.x_mid.data<float>()[i] + m.data<float>()[i];
  }

  x_final = x;
  xf = matrix(N, D), xf_rinv = Tensor::empty({N}, DType::f32);
  rmsnorm_forward(x.data<float>(), table_.param(*final_norm_).data<float>(), xf.data<float>(), xf_rinv.data<float>(), N, D, config_.norm_eps);
  logits_ = matrix(N, V);
  Tensor head = table_.param(*head_);
  d_.matmul(xf, head, logits_, {false, true, 1.0f, 0.0f});

  // Cross-entropy, mean over tokens; softmax probabilities kept for backward.
  probs_ = matrix(N, V);
  std::vector<double> row_loss(static_cast<size_t>(N));
  tbb::parallel_for(int64_t(0), N, [&](int64_t r) {
    const float* lr = logits_.data<float>() + r * V;
    float* pr = probs_.data<float>() + r * V;
    const float m = *std::max_element(lr, lr + V);
    double sum = 0;
    for (int64_t j = 0; j < V; ++j) sum += std::exp(double(lr[j] - m));
    const double lse = double(m) + std::log(sum);
    for (int64_t j = 0; j < V; ++j) pr[j] = float(std::exp(double(lr[j]) - lse));
    row_loss[size_t(r)] = lse - lr[targets_[size_t(r)]];
  });
  double loss = 0;
  for (double l : row_loss) loss += l;  // in row order: the same sum every time
  return loss / double(N);
}

void Model::backward() {
  if (tokens_.empty()) fail(ErrorKind::invalid_argument, "backward() before forward()");
  const int64_t N = batch_ * seq_, D = config_.dim, V = config_.vocab_size, H = config_.n_heads, KV = config_.kv_heads();
  const int64_t hd = config_.head_dim(), F = config_.hidden(), group = H / KV, seq = seq_;
  const float scale = float(1.0 / std::sqrt(double(hd)));

  Tensor dlogits = probs_.clone();
  float* dl = dlogits.data<float>();
  const float inv_n = float(1.0 / double(N));
  for (int64_t r = 0; r < N; ++r) {
    dl[r * V + targets_[size_t(r)]] -= 1.0f;
    for (int64_t j = 0; j < V; ++j) dl[r * V + j] *= inv_n;
  }
  Tensor dhead = table_.grad(*head_);
  d_.matmul(dlogits, xf, dhead, {true, false, 1.0f, 1.0f});
  Tensor dxf = matrix(N, D);
  d_.matmul(dlogits, table_.param(*head_), dxf, {false, false, 1.0f, 0.0f});
  Tensor dx = matrix(N, D);
  rmsnorm_backward(dxf.data<float>(), x_final.data<float>(), table_.param(*final_norm_).data<float>(), xf_rinv.data<float>(), dx.data<float>(),
                   table_.grad(*final_norm_).data<float>(), N, D);

  for (auto it = blocks_.rbegin(); it != blocks_.rend(); ++it) {
    Block& b = *it;
    // FFN branch: dx is the gradient of the block's output, which is x_mid + m.
    Tensor df_normed = matrix(N, F);
    linear_backward(dx, b.f_used, b.w_down, &df_normed, false);
    Tensor df = df_normed;
    if (config_.subln) {
      df = matrix(N, F);
      rmsnorm_backward(df_normed.data<float>(), b.f.data<float>(), table_.param(*b.ffn_sub_norm).data<float>(), b.f_rinv.data<float>(),
                       df.data<float>(), table_.grad(*b.ffn_sub_norm).data<float>(), N, F);
    }
    Tensor dh2 = matrix(N, D), dup = matrix(N, F);
    const float *dfp = df.data<float>(), *up = b.up.data<float>();
    if (config_.ffn == ModelConfig::Ffn::swiglu) {
      Tensor dgate = matrix(N, F);
      const float* gate = b.gate.data<float>();
      for (int64_t i = 0; i < N * F; ++i) {
        const float sig = 1.0f / (1.0f + std::exp(-gate[i]));
        dup.data<float>()[i] = dfp[i] * gate[i] * sig;
        dgate.data<float>()[i] = dfp[i] * up[i] * sig * (1.0f + gate[i] * (1.0f - sig));
      }
      linear_backward(dgate, b.h2_used, b.w_gate, &dh2, false);
      linear_backward(dup, b.h2_used, b.w_up, &dh2, true);
    } else {
      for (int64_t i = 0; i < N * F; ++i) dup.data<float>()[i] = up[i] > 0 ? 2.0f * up[i] * dfp[i] : 0.0f;
      linear_backward(dup, b.h2_used, b.w_up, &dh2, false);
    }
    Tensor dx_mid = matrix(N, D);
    rmsnorm_backward(dh2.data<float>(), b.x_mid.data<float>(), table_.param(*b.ffn_norm).data<float>(), b.h2_rinv.data<float>(),
                     dx_mid.data<float>(), table_.grad(*b.ffn_norm).data<float>(), N, D);
    for (int64_t i = 0; i < N * D; ++i) dx_mid.data<float>()[i] += dx.data<float>()[i];

    // Attention branch.
    Tensor datt_normed = matrix(N, H * hd);
    linear_backward(dx_mid, b.att_used, b.wo, &datt_normed, false);
    Tensor datt = datt_normed;
    if (config_.subln) {
      datt = matrix(N, H * hd);
      rmsnorm_backward(datt_normed.data<float>(), b.att.data<float>(), table_.param(*b.attn_sub_norm).data<float>(), b.att_rinv.data<float>(),
                       datt.data<float>(), table_.grad(*b.attn_sub_norm).data<float>(), N, H * hd);
    }
    Tensor dq = matrix(N, H * hd), dk = matrix(N, KV * hd), dv = matrix(N, KV * hd);
    const float *q = b.q.data<float>(), *k = b.k.data<float>(), *v = b.v.data<float>(), *probs = b.probs.data<float>(), *dout = datt.data<float>();
    float *dqp = dq.data<float>(), *dkp = dk.data<float>(), *dvp = dv.data<float>();
    // One task per (sequence, key/value head): it alone writes that head's dk and dv.
    tbb::parallel_for(int64_t(0), batch_ * KV, [&](int64_t bg) {
      const int64_t bi = bg / KV, g = bg % KV;
      std::vector<float> dp(static_cast<size_t>(seq));
      for (int64_t h = g * group; h < (g + 1) * group; ++h)
        for (int64_t t = 0; t < seq; ++t) {
          const float* p = probs + ((bi * H + h) * seq + t) * seq;
          const float* dot_ = dout + (bi * seq + t) * H * hd + h * hd;
          const float* qt = q + (bi * seq + t) * H * hd + h * hd;
          float* dqt = dqp + (bi * seq + t) * H * hd + h * hd;
          double row = 0;
          for (int64_t s = 0; s <= t; ++s) {
            const float* vs = v + (bi * seq + s) * KV * hd + g * hd;
            float* dvs = dvp + (bi * seq + s) * KV * hd + g * hd;
            float dot = 0;
            for (int64_t c = 0; c < hd; ++c) {
              dot += dot_[c] * vs[c];
              dvs[c] += p[s] * dot_[c];
            }
            dp[size_t(s)] = dot;
            row += double(p[s]) * dot;
          }
          for (int64_t s = 0; s <= t; ++s) {
            const float ds = p[s] * (dp[size_t(s)] - float(row)) * scale;
            const float* ks = k + (bi * seq + s) * KV * hd + g * hd;
            float* dks = dkp + (bi * seq + s) * KV * hd + g * hd;
            for (int64_t c = 0; c < hd; ++c) {
              dqt[c] += ds * ks[c];
              dks[c] += ds * qt[c];
            }
          }
        }
    });
    rope(dqp, N, H, hd, seq, rope_cos_.data(), rope_sin_.data(), -1.0f);
    rope(dkp, N, KV, hd, seq, rope_cos_.data(), rope_sin_.data(), -1.0f);
    Tensor dh1 = matrix(N, D);
    linear_backward(dq, b.h1_used, b.wq, &dh1, false);
    linear_backward(dk, b.h1_used, b.wk, &dh1, true);
    linear_backward(dv, b.h1_used, b.wv, &dh1, true);
    Tensor dx_in = matrix(N, D);
    rmsnorm_backward(dh1.data<float>(), b.x_in.data<float>(), table_.param(*b.attn_norm).data<float>(), b.h1_rinv.data<float>(),
                     dx_in.data<float>(), table_.grad(*b.attn_norm).data<float>(), N, D);
    for (int64_t i = 0; i < N * D; ++i) dx_in.data<float>()[i] += dx_mid.data<float>()[i];
    dx = dx_in;
  }
  // Embedding rows, in token order (deterministic accumulation).
  float* demb = table_.grad(*tok_emb_).data<float>();
  for (int64_t r = 0; r < N; ++r)
    for (int64_t j = 0; j < D; ++j) demb[int64_t(tokens_[size_t(r)]) * D + j] += dx.data<float>()[r * D + j];
}

}  // namespace hybrit
