// The decoder-only transformer of BitNet b1.58: token embedding; blocks of [RMSNorm -> attention
// (RoPE, grouped-query heads) -> residual; RMSNorm -> FFN (SwiGLU or relu^2) -> residual]; final
// RMSNorm; output head. Every linear layer inside the blocks is a BitLinear (absmean ternary
// weights, absmax int8 activations per token, straight-through backward); `quant none` is the
// full-precision twin. Forward and backward are written by hand, one pair per piece, on the CPU;
// matmuls and quantizers go through the dispatcher.
#pragma once
#include <cmath>
#include <string>
#include <vector>

#include "training/optim.hpp"

namespace hybrit {

struct ModelConfig {
  enum class Ffn { swiglu, relu2 };
  enum class Quant { ternary, none };
  int64_t vocab_size = 257;
  int64_t dim = 128;
  int64_t n_layers = 4;
  int64_t n_heads = 4;
  int64_t n_kv_heads = 0;  // 0: as many as n_heads (no grouping)
  int64_t ffn_hidden = 0;   // 0: SwiGLU 8/3 dim, relu^2 4 dim (rounded up to a multiple of 32)
  int64_t context = 64;     // the longest sequence RoPE positions are made for
  double rope_theta = 10000.0;
  double norm_eps = 1e-5;
  Ffn ffn = Ffn::swiglu;
  Quant quant = Quant::ternary;
  bool subln = false;            // RMSNorm before the attention output and FFN down projections
  bool tied_embeddings = false;  // the head reuses the token embedding

  int64_t head_dim() const { return dim / n_heads; }
  int64_t kv_heads() const { return n_kv_heads > 0 ? n_kv_heads : n_heads; }
  int64_t hidden() const;
  // One line naming the field and what is wrong, for any impossible shape.
  void validate() const;
};

// Pieces the inference forward (inference/model.cpp) shares with this one, so both compute the
// same numbers. rmsnorm_forward: y = x * g / rms(x) per row of d values; rinv (n values, or
// nullptr) keeps 1 / rms for backward. rope_tables: cos and sin of the RoPE angles,
// (context, head_dim / 2) each.
void rmsnorm_forward(const float* x, const float* g, float* y, float* rinv, int64_t n, int64_t d, double eps);
void rope_tables(const ModelConfig& config, std::vector<float>& cos_t, std::vector<float>& sin_t);
inline float silu(float g) { return g / (1.0f + std::exp(-g)); }

class Model {
 public:
  Model(const ModelConfig& config, Dispatcher& dispatcher, uint64_t seed);

  const ModelConfig& config() const { return config_; }
  ParamTable& params() { return table_; }

  // tokens and targets: batch * seq values, row-major (batch, seq), seq <= context. Returns the
  // mean cross-entropy and keeps what backward() needs.
  double forward(const int32_t* tokens, const int32_t* targets, int64_t batch, int64_t seq);
  const Tensor& logits() const { return logits_; }  // (batch * seq, vocab)
  // The last forward's final hidden states (after the final RMSNorm, what the head reads): (batch * seq, dim).
  const Tensor& final_hidden() const { return xf; }
  // Adds the gradients of the last forward's loss to params().grads().
  void backward();

 private:
  struct Linear {
    const ParamSlice* weight = nullptr;
    Tensor w_used;  // the weights the forward multiplied by: ternary * scale, or the latent ones
  };
  struct Block {
    const ParamSlice *attn_norm, *attn_sub_norm = nullptr, *ffn_norm, *ffn_sub_norm = nullptr;
    Linear wq, wk, wv, wo, w_gate, w_up, w_down;
    // Activations kept for backward, (rows, width) each.
    Tensor x_in, h1, h1_rinv, h1_used, q, k, v, probs, att, att_rinv, att_normed, att_used, x_mid, h2, h2_rinv, h2_used, gate, up,
        f, f_rinv, f_normed, f_used;
  };

  void quantize_weight(Linear& l);
  Tensor quantize_activations(const Tensor& x);
  void linear_forward(const Tensor& x_used, Linear& l, Tensor& y);
  void linear_backward(const Tensor& dy, const Tensor& x_used, const Linear& l, Tensor* dx, bool accumulate_dx);

  ModelConfig config_;
  Dispatcher& d_;
  ParamTable table_;
  const ParamSlice *tok_emb_, *final_norm_, *head_;
  std::vector<Block> blocks_;
  std::vector<float> rope_cos_, rope_sin_;  // (context, head_dim / 2)
  // The last forward's inputs and top-level activations.
  std::vector<int32_t> tokens_, targets_;
  int64_t batch_ = 0, seq_ = 0;
  Tensor x_final, xf, xf_rinv, logits_, probs_;
};

}  // namespace hybrit
