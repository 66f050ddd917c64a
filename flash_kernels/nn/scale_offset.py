"""Per-role scale and offset of the shared z: the cheap queries and keys of the GAU."""

import torch
from torch import nn

from ..core.roles import scale_offset_roles


class ScaleOffset(nn.Module):
    """role_r = z * gamma[r] + beta[r] for r = 0 .. roles - 1 (per-dimension affine maps of z).

    gamma, beta: (roles, s). Initialisation as in the paper's code: gamma ~ N(0, 0.02^2),
    beta = 0. With 4 roles the rows are (quad_q, quad_k, lin_q, lin_k), with 2 (quad_q, quad_k),
    the layout `flash_kernels.flash_attention` takes, so a layer can hand gamma and beta to the
    fused op directly and use `forward` only where it needs the role tensors themselves.
    """

    def __init__(self, roles, s, init_std=0.02):
        super().__init__()
        self.gamma = nn.Parameter(torch.randn(roles, s) * init_std)
        self.beta = nn.Parameter(torch.zeros(roles, s))

    @property
    def roles(self):
        return self.gamma.shape[0]

    def forward(self, z):
        """z: (*batch, T, s) -> list of `roles` tensors of z's shape and dtype.

        Each role is formed in float32 and rounded to z's dtype: exactly what the fused op
        does, so a decoding step that forms roles here matches the full forward bit for bit.
        """
        return scale_offset_roles(z, self.gamma, self.beta)
