"""Transformer++ baseline for the FLASH comparison (the paper's strongest softmax baseline):
pre-RMSNorm blocks of multi-head softmax attention with RoPE and a SwiGLU feed-forward, tied
embedding and output head. Attention runs through torch.nn.functional.scaled_dot_product_attention.
"""

import torch
import torch.nn.functional as F
from torch import nn

from flash_kernels.nn import RotaryEmbedding


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps)."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        x32 = x.float()
        return (self.weight * x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)).to(
            x.dtype
        )


class SwiGLU(nn.Module):
    """FFN(x) = (silu(x W_1) * x W_3) W_2 with hidden width h."""

    def __init__(self, d, hidden):
        super().__init__()
        self.w13 = nn.Linear(d, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        a, b = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(a) * b)


class CausalSelfAttention(nn.Module):
    """softmax(q k^T / sqrt(dh) + causal mask) v per head; RoPE on q and k at absolute positions."""

    def __init__(self, d, heads):
        super().__init__()
        if d % heads:
            raise ValueError(f"d={d} is not a multiple of heads={heads}")
        self.heads, self.head_dim = heads, d // heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        self.rope = RotaryEmbedding(self.head_dim)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        pos = torch.arange(T, device=x.device)
        q, k = self.rope(q, pos), self.rope(k, pos)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, T, d))


class TransformerPPBlock(nn.Module):
    def __init__(self, d, heads, ffn_hidden):
        super().__init__()
        self.norm1, self.attn = RMSNorm(d), CausalSelfAttention(d, heads)
        self.norm2, self.ffn = RMSNorm(d), SwiGLU(d, ffn_hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


def default_ffn_hidden(d):
    """The SwiGLU width of LLaMA-style blocks: 8d/3 rounded to a multiple of 8."""
    return 8 * round(8 * d / 3 / 8)


def transformer_pp_params(vocab_size, d, depth, ffn_hidden):
    """Parameters of TransformerPP: the tied embedding (vocab x d), per block two RMSNorm
    weights (2d), q/k/v/out (4 d^2) and the SwiGLU's W_1, W_3, W_2 (3 d h); the final norm (d)."""
    return vocab_size * d + depth * (2 * d + 4 * d * d + 3 * d * ffn_hidden) + d


def matching_config(vocab_size, d, target_params, max_depth=64):
    """(depth, ffn_hidden) of a width-d TransformerPP with about `target_params` parameters.

    The depth is the one whose default FFN width comes closest; then the FFN width (any integer
    >= 1) closes the rest of the gap, since the count is linear in it (3 d depth per unit)."""
    depth = min(
        range(1, max_depth + 1),
        key=lambda n: abs(
            transformer_pp_params(vocab_size, d, n, default_ffn_hidden(d)) - target_params
        ),
    )
    without_ffn = transformer_pp_params(vocab_size, d, depth, 0)
    hidden = max(1, round((target_params - without_ffn) / (3 * d * depth)))
    return depth, hidden


class TransformerPP(nn.Module):
    """Causal LM: embedding, `depth` Transformer++ blocks, final RMSNorm, tied head.

    Per block 4 d^2 attention weights and 3 d h FFN weights (by default h = 8d/3 rounded to a
    multiple of 8: about 12 d^2 in all, as much as two GAU/FLASH layers with e = 2d);
    `matching_config` picks depth and h for a given parameter count.
    """

    def __init__(self, vocab_size, d, depth, heads=None, ffn_hidden=None, init_std=0.02):
        super().__init__()
        heads = heads or max(1, d // 64)
        ffn_hidden = ffn_hidden or default_ffn_hidden(d)
        self.vocab_size, self.ffn_hidden = vocab_size, ffn_hidden
        self.embed = nn.Embedding(vocab_size, d)
        nn.init.normal_(self.embed.weight, std=init_std)
        self.blocks = nn.ModuleList(TransformerPPBlock(d, heads, ffn_hidden) for _ in range(depth))
        self.norm = RMSNorm(d)

    def forward(self, idx):
        h = self.embed(idx)
        for block in self.blocks:
            h = block(h)
        return self.norm(h) @ self.embed.weight.t()

    def loss(self, idx, targets):
        logits = self(idx)
        return F.cross_entropy(logits.float().reshape(-1, self.vocab_size), targets.reshape(-1))
