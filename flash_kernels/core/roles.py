"""The four roles of FLASH's shared z: the queries and keys of the quadratic (intra-chunk) and
linear (inter-chunk) parts. Their order is that of gamma and beta's rows, of the kernels' ROLE
constexprs (backends/triton/kernels/common.py) and of `affine_stack`'s columns.

    role_r = z * gamma[r] + beta[r]     formed in float32, rounded to z's dtype
"""

import torch

QUAD_Q, QUAD_K, LIN_Q, LIN_K = 0, 1, 2, 3
ROLE_NAMES = ("quad_q", "quad_k", "lin_q", "lin_k")


def scale_offset_roles(z, gamma, beta):
    """The len(gamma) role tensors z * gamma[r] + beta[r], formed in float32, in z's dtype."""
    compute = torch.promote_types(z.dtype, torch.float32)
    z_wide = z.to(compute)
    return [
        (z_wide * gamma[r].to(compute) + beta[r].to(compute)).to(z.dtype)
        for r in range(gamma.shape[0])
    ]


def affine_stack(gamma, beta):
    """The kernels' float32 (2, 4, S) [gamma; beta] (rows past R zero), differentiable: the
    Triton kernels form every role from z and this one tensor."""
    pad = gamma.new_zeros((4 - gamma.shape[0], gamma.shape[1]), dtype=torch.float32)
    return torch.stack([torch.cat([gamma.float(), pad]), torch.cat([beta.float(), pad])])
