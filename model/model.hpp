// The decoder-only transformer of BitNet b1.58: token embedding; blocks of [RMSNorm -> attention
// (RoPE, grouped-query heads) -> residual; RMSNorm -> FFN (SwiGLU or relu^2) -> residual]; final
// RMSNorm; output head. Every linear layer inside the blocks is a BitLinear (absmean ternary
// weights, absmax int8 activations per token, straight-through backward); `quant none` is the
// full-precision twin. Forward and backward are written by hand, one pair per piece, on the CPU:
// matmuls, quantizers and attention are ops of the op table, the loops between them kernels of
// model/kernels.hpp, all routed by the dispatcher. Activation buffers live as long as the
// model and are reused by every step of the same shape (no per-step allocation or page faults).
#pragma once
#include <functional>
#include <cmath>
#include <string>
#include <vector>

#include "dispatch/dispatcher.hpp"
#include "model/params.hpp"

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

  // The largest shapes accepted (the config schema's ranges read these): far beyond what a CPU
  // trains, small enough that no size product overflows before the memory check refuses it.
  static constexpr int64_t kMaxVocab = 65536, kMaxDim = 65536, kMaxLayers = 4096, kMaxHeads = 4096, kMaxFfnHidden = 1 << 20,
                           kMaxContext = 65536;

  int64_t head_dim() const { return dim / n_heads; }
  int64_t kv_heads() const { return n_kv_heads > 0 ? n_kv_heads : n_heads; }
  int64_t hidden() const;
  // One line naming the field and what is wrong, for any impossible shape.
  void validate() const;
};

// What the inference forward (inference/model.cpp) shares with this one besides the kernels, so
// both compute the same numbers: cos and sin of the RoPE angles, (context, head_dim / 2) each.
void rope_tables(const ModelConfig& config, std::vector<float>& cos_t, std::vector<float>& sin_t);

class Model {
 public:
  // Activation recomputation (train.recompute): none keeps every activation for the backward;
  // attention keeps the attention sublayer's (q, k, v, its output) for one block at a time and
  // recomputes them in the backward; block keeps only each block's input and recomputes the
  // whole block. Recomputation runs the same kernels on the same inputs: the same bits.
  enum class Recompute { none, attention, block };
  void set_recompute(Recompute r) { recompute_ = r; }
  Recompute recompute() const { return recompute_; }
  // Bytes of activations a forward of (batch, seq) keeps for the backward, and the scratch the
  // backward adds, for a model and recompute setting (the trainer's memory check).
  static double activation_bytes(const ModelConfig& config, Recompute recompute, int64_t batch, int64_t seq);
  // Floats the parameter table of a model of this configuration allocates (slices padded to 64 bytes).
  static int64_t parameter_count(const ModelConfig& config);
  // The parameter table's slices, in order: names, shapes and groups (what checkpoints store).
  static void declare_parameters(const ModelConfig& config, ParamTable& table);

  Model(const ModelConfig& config, Dispatcher& dispatcher, uint64_t seed);

  const ModelConfig& config() const { return config_; }
  ParamTable& params() { return table_; }
  const ParamTable& params() const { return table_; }

  // tokens and targets: batch * seq values, row-major (batch, seq), seq <= context. Returns the
  // mean cross-entropy and keeps what backward() needs.
  double forward(const int32_t* tokens, const int32_t* targets, int64_t batch, int64_t seq);
  const Tensor& logits() const { return logits_; }  // (batch * seq, vocab)
  // The last forward's final hidden states (after the final RMSNorm, what the head reads): (batch * seq, dim).
  const Tensor& final_hidden() const { return xf; }
  // Adds the gradients of loss_scale * (the last forward's loss) to params().grads(); gradient
  // accumulation passes 1 / micro-batches, so the sum is the gradient of the mean.
  // `ready`, when given, is called with [offset, offset + numel) of the gradient buffer each time
  // a range of it is final for this backward: the final norm (and an untied head), then each
  // block, last first, then the embedding; the ranges cover the buffer once. Data-parallel
  // training starts each range's all-reduce there, while the backward goes on.
  using GradientsReady = std::function<void(int64_t offset, int64_t numel)>;
  void backward(float loss_scale = 1.0f, const GradientsReady& ready = {});
  // The (offset, numel) ranges backward() hands `ready`, in that order.
  std::vector<std::pair<int64_t, int64_t>> gradient_ranges() const;

 private:
  struct Linear {
    const ParamSlice* weight = nullptr;
    Tensor w_tilde;  // the weights the forward multiplied by: ternary * scale, or the latent ones
  };
  // Activations kept for backward, (rows, width) each; lse is (batch, heads, seq). No
  // (seq x seq) attention matrix: the attention backward recomputes it from q, k and lse.
  // x~ (the *_tilde tensors): the fake-quantized input a BitLinear multiplies, int8 levels times
  // the row scale (as the docs write it: dW = dy^T x~); with quant none it shares storage with x.
  struct AttentionActivations {  // what the attention sublayer makes from h1_tilde
    Tensor q, k, v;        // (N, heads x head_dim), (N, kv_heads x head_dim) x 2, after RoPE
    Tensor att, lse;       // the attention output (N, heads x head_dim) and each row's log-sum-exp (batch, heads, seq)
    Tensor att_rinv, att_normed, att_tilde;  // SubLN's 1/rms per row, its output, and what wo multiplies (int8-quantized)
  };
  struct BlockActivations {  // the rest of a block, from its input to its output
    Tensor h1, h1_rinv, h1_tilde;  // the attention norm of x_in (N, D), its 1/rms per row, what wq/wk/wv multiply
    Tensor x_mid;                 // x_in + wo(att): the FFN's input (N, D)
    Tensor h2, h2_rinv, h2_tilde;  // the FFN norm of x_mid, its 1/rms, what w_gate/w_up multiply
    Tensor gate, up, ffn_act;     // (N, F): w_gate h2, w_up h2, and swiglu(gate, up) or relu(up)^2
    Tensor f_rinv, f_normed, f_tilde;  // SubLN of ffn_act: 1/rms, output, and what w_down multiplies
  };
  struct Block {
    const ParamSlice *attn_norm, *attn_sub_norm = nullptr, *ffn_norm, *ffn_sub_norm = nullptr;
    Linear wq, wk, wv, wo, w_gate, w_up, w_down;
    Tensor x_in, x_out;  // always kept: recomputation starts from x_in
    AttentionActivations attn;  // used with recompute none
    BlockActivations rest;      // used with recompute none or attention
  };
  // Buffers the backward reuses from block to block.
  struct Scratch {
    Tensor dx, dx_mid, dh, df, df_normed, dgate, dup, datt, datt_normed, dq, dk, dv, dlogits, dxf, q8, q8_scales;
  };

  void quantize_weight(Linear& l);
  // The activations a BitLinear multiplies, into `out`: q / s per row from the absmax quantizer,
  // or x itself (out then shares x's storage).
  void quantize_activations(const Tensor& x, Tensor& out);
  void linear_forward(const Tensor& x_tilde, Linear& l, Tensor& y, bool accumulate = false);
  void linear_backward(const Tensor& dy, const Tensor& x_tilde, const Linear& l, Tensor* dx, bool accumulate_dx);
  void rmsnorm(const Tensor& x, const ParamSlice& gain, Tensor& y, Tensor& rinv);
  // dx = the RMSNorm backward of dy (+ residual); the gain's gradient is added to the table.
  void rmsnorm_backward(const Tensor& dy, const Tensor& x, const ParamSlice& gain, const Tensor& rinv, const Tensor* residual, Tensor& dx);
  void rope(Tensor& x, int64_t heads, float sign);
  AttentionShape attention_shape() const;
  // Where a block's activations live: its own buffers, or buffers shared by all blocks that the
  // backward refills by recomputing (train.recompute).
  AttentionActivations& attention_activations(Block& b) { return recompute_ == Recompute::none ? b.attn : shared_attn_; }
  BlockActivations& block_activations(Block& b) { return recompute_ == Recompute::block ? shared_rest_ : b.rest; }
  // The forward and backward, one pair per piece (llm.c's layout), with their shapes in the .cpp:
  //   embedding_forward / embedding_backward      tokens -> x_embed; dx -> the embedding's gradient
  //   attention_sublayer / attention_backward     h1_tilde -> att_tilde; dx_mid -> dx (through the norm)
  //   ffn_sublayer / ffn_backward                 x_mid -> f_tilde; dx -> dx_mid
  //   head_forward / head_backward                x -> logits, loss; loss -> dx
  // block_forward chains the two sublayers with their residual adds; backward() runs the
  // backward pieces in reverse, block by block, handing over finished gradient ranges.
  void embedding_forward();
  void embedding_backward();
  // The attention sublayer from r.h1_tilde: q, k, v, RoPE, attention, SubLN, quantization.
  void attention_sublayer(Block& b, const BlockActivations& r, AttentionActivations& a);
  void attention_backward(Block& b);
  // The FFN sublayer from r.x_mid: norm, quantization, up (and gate), SwiGLU or relu^2, SubLN, quantization.
  void ffn_sublayer(Block& b, BlockActivations& r);
  void ffn_backward(Block& b);
  double head_forward(const Tensor& x);
  void head_backward(float loss_scale);
  // A block's forward from b.x_in; the last GEMM (into b.x_out) only when `write_output`.
  void block_forward(Block& b, bool write_output);

  ModelConfig config_;
  Dispatcher& d_;
  ParamTable table_;
  const ParamSlice *tok_emb_, *final_norm_, *head_;
  std::vector<Block> blocks_;
  std::vector<float> rope_cos_, rope_sin_;  // (context, head_dim / 2)
  // The last forward's inputs and top-level activations.
  std::vector<int32_t> tokens_, targets_;
  int64_t batch_ = 0, seq_ = 0;
  Tensor x_embed, xf, xf_rinv, logits_;
  std::vector<double> row_lse_, row_loss_;  // the cross-entropy's log-sum-exp and loss per row
  Scratch scratch_;
  Recompute recompute_ = Recompute::none;
  AttentionActivations shared_attn_;
  BlockActivations shared_rest_;
};

}  // namespace hybrit
