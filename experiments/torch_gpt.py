"""hybrit's architecture written the way PyTorch users write a GPT (nanoGPT / Llama style): nn.Module
blocks of nn.Linear(bias=False), RMSNorm, rotary embeddings, grouped-query causal softmax
attention, SwiGLU, and, for the 1.58-bit twin, BitNet's fake quantization with a straight-through
estimator (absmean ternary weights, absmax int8 activations per token), as the BitNet b1.58
reference code does it. PyTorch 1.13 (Debian's python3-torch) has no fused attention or RMSNorm,
so those are the plain formulas; everything else is the library's own ops.

The baseline of experiments/bench_train.py; load_hybrit_weights() copies a hybrit model's initial
parameters in, so both sides start from the same weights.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def activation_quant(x):
    scale = 127.0 / x.abs().max(dim=-1, keepdim=True).values.clamp_(min=1e-5)
    return (x * scale).round().clamp_(-128, 127) / scale


def weight_quant(w):
    scale = w.abs().mean().clamp_(min=1e-5)
    return (w / scale).round().clamp_(-1, 1) * scale


class BitLinear(nn.Linear):
    """nn.Linear with BitNet b1.58's fake quantization and the straight-through estimator."""

    def forward(self, x):
        x_q = x + (activation_quant(x) - x).detach()
        w_q = self.weight + (weight_quant(self.weight) - self.weight).detach()
        return F.linear(x_q, w_q)


class Block(nn.Module):
    def __init__(self, cfg, linear):
        super().__init__()
        d, h, kv = cfg["dim"], cfg["n_heads"], cfg["n_kv_heads"]
        self.h, self.kv, self.hd = h, kv, d // h
        self.attn_norm = RMSNorm(d, cfg["norm_eps"])
        self.wq = linear(d, h * self.hd, bias=False)
        self.wk = linear(d, kv * self.hd, bias=False)
        self.wv = linear(d, kv * self.hd, bias=False)
        self.wo = linear(h * self.hd, d, bias=False)
        self.ffn_norm = RMSNorm(d, cfg["norm_eps"])
        self.w_gate = linear(d, cfg["ffn_hidden"], bias=False)
        self.w_up = linear(d, cfg["ffn_hidden"], bias=False)
        self.w_down = linear(cfg["ffn_hidden"], d, bias=False)

    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        h = self.attn_norm(x)
        q = self.wq(h).view(B, T, self.h, self.hd).transpose(1, 2)
        k = self.wk(h).view(B, T, self.kv, self.hd).transpose(1, 2)
        v = self.wv(h).view(B, T, self.kv, self.hd).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if self.kv != self.h:
            k = k.repeat_interleave(self.h // self.kv, dim=1)
            v = v.repeat_interleave(self.h // self.kv, dim=1)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.hd))
        att = att.masked_fill(mask[:T, :T], float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, self.h * self.hd)
        x = x + self.wo(y)
        h = self.ffn_norm(x)
        return x + self.w_down(F.silu(self.w_gate(h)) * self.w_up(h))


def rotate(x, cos, sin):
    """Rotary embedding, half-split pairs (i, i + hd/2) as in HF Llama."""
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    T = x.shape[-2]
    c, s = cos[:T], sin[:T]
    return torch.cat([a * c - b * s, a * s + b * c], dim=-1)


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        linear = BitLinear if cfg["quant"] == "ternary" else nn.Linear
        d, ctx = cfg["dim"], cfg["context"]
        self.tok_emb = nn.Embedding(cfg["vocab_size"], d)
        self.blocks = nn.ModuleList([Block(cfg, linear) for _ in range(cfg["n_layers"])])
        self.final_norm = RMSNorm(d, cfg["norm_eps"])
        self.head = nn.Linear(d, cfg["vocab_size"], bias=False)
        hd = d // cfg["n_heads"]
        inv = cfg["rope_theta"] ** (-torch.arange(0, hd // 2, dtype=torch.float64) * 2 / hd)
        ang = torch.arange(ctx, dtype=torch.float64)[:, None] * inv[None, :]
        self.register_buffer("cos", ang.cos().float(), persistent=False)
        self.register_buffer("sin", ang.sin().float(), persistent=False)
        self.register_buffer("mask", torch.triu(torch.ones(ctx, ctx, dtype=torch.bool), diagonal=1), persistent=False)

    def forward(self, idx, targets):
        x = self.tok_emb(idx)
        for block in self.blocks:
            x = block(x, self.cos, self.sin, self.mask)
        logits = self.head(self.final_norm(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def load_hybrit_weights(model, params):
    """params: hybrit's {name: numpy array}, names as hybrit's parameter table has them."""
    state = {name + ".weight": torch.from_numpy(value.copy()) for name, value in params.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k in ("cos", "sin", "mask") for k in missing), (missing, unexpected)
