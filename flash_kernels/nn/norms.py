"""Pre-norms of the layers: ScaleNorm (the FLASH paper's choice) or LayerNorm."""

import math

import torch
from torch import nn


class ScaleNorm(nn.Module):
    """ScaleNorm (Nguyen & Salazar, 2019): y = g * x / max(||x||_2, eps), one learned scalar g.

    g starts at sqrt(d), so a normalised row has unit root-mean-square, like LayerNorm's output.
    """

    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.g = nn.Parameter(torch.tensor(math.sqrt(d)))

    def forward(self, x):
        # the norm in float32 at least: a half-precision sum of d squares overflows quickly
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        norm = x32.norm(dim=-1, keepdim=True).clamp_min(self.eps)
        return (self.g * x32 / norm).to(x.dtype)


NORMS = ("scalenorm", "layernorm")


def make_norm(kind, d):
    """`kind` is "scalenorm" or "layernorm"."""
    if kind == "scalenorm":
        return ScaleNorm(d)
    if kind == "layernorm":
        return nn.LayerNorm(d)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")
