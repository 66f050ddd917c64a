"""GAU and FLASH layers: the Gated Attention Unit with full or mixed chunk attention."""

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import flash_attention, mixed_chunk_attention
from ..core.validation import BACKENDS, check_bool, check_int, check_scale, type_name
from ..decoding import flash_attention_decode, mixed_chunk_decode, prefill_attention
from .cache import AttentionCache, check_lengths
from .norms import make_norm
from .position import RotaryEmbedding, make_rel_pos
from .scale_offset import ScaleOffset


def check_layer_options(*, d, s, expansion, linear, causal, rope, quad_scale, lin_scale):
    """The sizes are positive ints, the switches bools, the scales finite reals or None."""
    check_int("d", d, minimum=1)
    check_int("s", s, minimum=1)
    check_int("expansion", expansion, minimum=1)
    for name, value in (("linear", linear), ("causal", causal), ("rope", rope)):
        check_bool(name, value)
    check_scale("quad_scale", quad_scale)
    check_scale("lin_scale", lin_scale)


def positions_in_documents(cu_seqlens, T, device):
    """(T,) position of every token inside its packed document: t - cu_seqlens[doc(t)]."""
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    t = torch.arange(T, device=device)
    doc = torch.searchsorted(cu[1:], t, right=True).clamp(max=max(cu.numel() - 2, 0))
    return t - cu[doc]


def packed_chunk_len(cu_seqlens, max_seqlen):
    """C of one-chunk-per-document attention (chunk_size=None): max_seqlen, or the longest
    document (read from cu_seqlens: a device sync if it is on a GPU)."""
    if max_seqlen is not None:
        return max_seqlen
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    return max(max(lengths, default=1), 1)


class GatedAttentionLayer(nn.Module):
    """A pre-norm Gated Attention Unit with residual (Hua et al. 2022, section 2):

        h       = norm(x)                                   x: (batch, T, d)
        u, v, z = silu(h W + b), split into e, e, s features   (one d x (2e + s) projection)
        role_r  = z * gamma_r + beta_r                      (ScaleOffset; then RoPE if enabled)
        a       = mixed_chunk_attention(roles, v)           relu^2 inside chunks (+ linear part)
        out     = x + (u * a) W_o + b_o

    `GAU` (one chunk as long as the sequence, two roles) and `FLASH` (chunks of C tokens, four
    roles: quadratic plus linear attention) are the two configurations; use those.

    The attention runs through `flash_kernels.flash_attention` (roles, attention and gate in one
    op) unless RoPE is on: then the roles are formed and rotated here, at absolute token
    positions, and `mixed_chunk_attention` takes them (the fused op has no RoPE).

    Padding (`key_padding_mask`, True = padded, as in torch.nn.MultiheadAttention): the u, v and
    z of padded tokens are replaced by zeros (selected, so even a NaN or inf there is gone).
    Both attention parts weight values (quad_i = sum_j a_ij v_j, lin_i = q_i^T sum_j k_j v_j^T),
    so a zero v_j removes token j from every other token's output (and its gradient:
    dA_ij = dO_i . v_j = 0). The layer's update at padded positions is zero too, so they carry
    their residual only.

    Packed documents (`cu_seqlens`): the attention op keeps them apart, and RoPE positions
    restart at each document.
    """

    def __init__(
        self,
        d,
        *,
        s,
        expansion,
        chunk_size,
        linear,
        causal,
        rel_pos,
        rope,
        norm,
        quad_scale,
        lin_scale,
        max_distance,
        backend,
        t5_buckets=32,
        t5_max_distance=128,
    ):
        super().__init__()
        check_layer_options(
            d=d,
            s=s,
            expansion=expansion,
            linear=linear,
            causal=causal,
            rope=rope,
            quad_scale=quad_scale,
            lin_scale=lin_scale,
        )
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.d, self.s, self.e = d, s, expansion * d
        self.chunk_size = chunk_size
        self.linear = linear
        self.causal = causal
        self.quad_scale = quad_scale
        self.lin_scale = lin_scale
        self.backend = backend
        self.norm = make_norm(norm, d)
        self.to_uvz = nn.Linear(d, 2 * self.e + s)
        self.scale_offset = ScaleOffset(4 if linear else 2, s)
        self.rel_pos = make_rel_pos(
            rel_pos,
            causal=causal,
            max_distance=max_distance,
            t5_buckets=t5_buckets,
            t5_max_distance=t5_max_distance,
        )
        self.rope = RotaryEmbedding(s) if rope else None
        self.to_out = nn.Linear(self.e, d)

    # -- pieces shared by the full forward and the decoding step -------------------------------

    def _check_input(self, x, shape):
        """x is a tensor on the layer's device in its dtype (any floating dtype under autocast)
        of `shape` ("batch" matches any size), else an error naming x."""
        expected = f"({', '.join(str(n) for n in shape)})"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape {expected}, got {type_name(x)}")
        if x.dim() != len(shape) or x.shape[-1] != self.d:
            raise ValueError(f"x must have shape {expected}, got {tuple(x.shape)}")
        weight = self.to_uvz.weight
        if x.device != weight.device:
            raise ValueError(f"x is on {x.device} but the layer is on {weight.device}")
        autocast = x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type)
        if x.dtype != weight.dtype and not (autocast and x.is_floating_point()):
            raise TypeError(
                f"x has dtype {x.dtype} but the layer's parameters are {weight.dtype}: "
                f"convert x (x.to({weight.dtype})) or the layer (layer.to({x.dtype}))"
            )

    def _uvz(self, x):
        u, v, z = F.silu(self.to_uvz(self.norm(x))).split([self.e, self.e, self.s], dim=-1)
        return u, v, z

    def _roles(self, z, positions):
        """[quad_q, quad_k(, lin_q, lin_k)], rotated at `positions` when RoPE is on."""
        roles = self.scale_offset(z)
        if self.rope is not None:
            roles = [self.rope(r, positions) for r in roles]
        return roles

    def _chunk_len(self, T):
        return self.chunk_size if self.chunk_size is not None else T

    def _rel_bias(self, C):
        return self.rel_pos.toeplitz(C) if self.rel_pos is not None and C else None

    # -- full forward ---------------------------------------------------------------------------

    def forward(
        self,
        x,
        key_padding_mask=None,
        cache=None,
        *,
        cu_seqlens=None,
        max_seqlen=None,
        cp_group=None,
        start=None,
    ):
        """x: (batch, T, d) -> (batch, T, d).

        key_padding_mask: optional (batch, T) bool, True at padded tokens: they are removed by
            selection (their u, v and z are replaced by zeros, whatever they hold), so no real
            token sees them, and their own update is zero (they carry their residual only).
        cache: optional `AttentionCache` (causal layers) to prefill: an empty one is filled from
            this sequence; a filled one is continued, x being the tokens after those it has
            seen (so a prompt prefilled in pieces gives the cache and outputs of one prefill).
        cu_seqlens, max_seqlen: packed documents along T, as in mixed_chunk_attention: no
            attention or state crosses a document boundary, and RoPE positions restart at
            each document's first token.
        cp_group: context parallelism (a torch.distributed ProcessGroup): x is this rank's
            contiguous slice of the sequences (rank order; every slice but the last rank's a
            multiple of chunk_size; same batch on every rank). The output and x's gradient
            are the single-process layer's on the slice; the parameters get this rank's
            partial gradients, whose sum over the ranks (the usual all-reduce) is the
            whole-sequence gradient. See mixed_chunk_attention. FLASH layers only (a GAU's
            one chunk spans the sequence).
        start: the position of x's first token in the sequence (RoPE), default 0; required
            with cp_group when RoPE is on (the sum of the earlier ranks' slice lengths). Not
            with cu_seqlens (a ValueError): positions restart at 0 at each document's first
            token, so a start would have nothing to shift.
        """
        self._check_input(x, ("batch", "T", self.d))
        B, T, _ = x.shape
        if start is not None and cu_seqlens is not None:
            raise ValueError(
                "start does not go with cu_seqlens: the positions of packed "
                "documents restart at 0 at each document's first token; leave "
                "start out"
            )
        start = self._check_context_parallel(cp_group, start, cache)
        if cache is not None:
            if not self.causal:
                raise ValueError("a decoding cache needs a causal layer")
            if key_padding_mask is not None or cu_seqlens is not None:
                raise ValueError("prefill takes neither a key_padding_mask nor cu_seqlens")
            if cache.initialized and cache.v.shape[0] != B:
                raise ValueError(f"the cache holds batch {cache.v.shape[0]}, x has batch {B}")
        u, v, z = self._uvz(x)
        padded = None
        if key_padding_mask is not None:
            if key_padding_mask.shape != (B, T) or key_padding_mask.dtype != torch.bool:
                raise ValueError(
                    f"key_padding_mask must be a bool tensor of shape ({B}, {T}), "
                    f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
                )
            padded = key_padding_mask.unsqueeze(-1)
            u, v, z = (
                torch.where(padded, torch.zeros((), dtype=t.dtype, device=t.device), t)
                for t in (u, v, z)
            )
        if cache is not None:
            y = self._attend_after_cache(u, v, z, cache)
        else:
            y = self._attend(u, v, z, cu_seqlens, max_seqlen, cp_group, start)
        update = self.to_out(y)
        if padded is not None:
            update = torch.where(
                padded, torch.zeros((), dtype=update.dtype, device=update.device), update
            )
        return x + update

    def _check_context_parallel(self, cp_group, start, cache):
        """The checked start (an int >= 0, default 0) of the slice x."""
        if start is not None:
            check_int("start", start, minimum=0)
        if cp_group is None:
            return start or 0
        if self.chunk_size is None:
            raise ValueError(
                "cp_group needs a chunked layer (FLASH): a GAU attends the whole "
                "sequence as one chunk, which cannot be split across ranks"
            )
        if cache is not None:
            raise ValueError("cp_group does not take a decoding cache (prefill one process)")
        if self.rope is not None and start is None:
            raise ValueError(
                "with cp_group and RoPE, pass start: the position of this rank's "
                "first token (the sum of the earlier ranks' slice lengths)"
            )
        return start or 0

    def _attend(self, u, v, z, cu_seqlens, max_seqlen, cp_group=None, start=0):
        """u * attention(roles of z, v) over the whole sequence (or its packed documents), or
        over this rank's slice starting at position `start` under context parallelism."""
        T = v.shape[1]
        if cu_seqlens is None:
            C = self._chunk_len(T)
            positions = start + torch.arange(T, device=v.device)
        else:
            C = (
                self.chunk_size
                if self.chunk_size is not None
                else packed_chunk_len(cu_seqlens, max_seqlen)
            )
            positions = positions_in_documents(cu_seqlens, T, v.device)
        options = dict(
            chunk_size=self.chunk_size,
            causal=self.causal,
            rel_bias=self._rel_bias(C),
            quad_scale=self.quad_scale,
            lin_scale=self.lin_scale,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
            backend=self.backend,
        )
        if cp_group is not None:
            options["cp_group"] = cp_group
        if self.rope is None:
            gamma, beta = self.scale_offset.gamma, self.scale_offset.beta
            return flash_attention(z, gamma, beta, v, u=u, **options)
        roles = self._roles(z, positions)
        q_lin, k_lin = roles[2:] if self.linear else (None, None)
        return u * mixed_chunk_attention(roles[0], roles[1], q_lin, k_lin, v, **options)

    def _attend_after_cache(self, u, v, z, cache, lengths=None):
        """Prefill: u * the attention of the new tokens after those the cache holds, and the
        cache moved past them, in one call of the op (decoding.prefill_attention: row b
        continues its sequence by its first lengths[b] tokens, all T without lengths)."""
        B, T, _ = v.shape
        held_rows = cache.capacity if cache.initialized else 0
        self._prepare_cache(cache, B, T, v.dtype, v.device)
        positions = cache.position[:, None] + torch.arange(T, device=v.device)
        roles = [
            r.reshape(B, T, self.s)
            for r in self._roles(z.reshape(B * T, self.s), positions.reshape(-1))
        ]
        q_lin, k_lin = roles[2:] if self.linear else (None, None)
        out = prefill_attention(
            cache,
            roles[0],
            roles[1],
            q_lin,
            k_lin,
            v,
            held_rows=held_rows,
            lengths=lengths,
            rel_bias_for=self._rel_bias,
            quad_scale=self.quad_scale,
            lin_scale=self.lin_scale,
            backend=self.backend,
        )
        cache.max_tokens += T
        return u * out

    # -- incremental decoding -------------------------------------------------------------------

    def new_cache(self):
        return AttentionCache()

    def _prepare_cache(self, cache, batch, new_tokens, dtype, device):
        """Allocate the cache on first use, and grow one-chunk (GAU) buffers so that
        `new_tokens` more tokens per sequence fit (host-side bookkeeping: cache.max_tokens)."""
        if self.chunk_size is not None:
            capacity = self.chunk_size
        else:
            capacity = cache.capacity if cache.initialized else max(16, cache.min_capacity)
            while capacity < cache.max_tokens + new_tokens:
                capacity *= 2
        if not cache.initialized:
            cache.allocate(
                batch,
                self.s,
                self.e,
                capacity,
                chunk_size=self.chunk_size,
                linear=self.linear,
                dtype=dtype,
                device=device,
            )
            return
        if cache.v.shape[0] != batch:
            raise ValueError(f"the cache holds batch {cache.v.shape[0]}, x has batch {batch}")
        if cache.v.dtype != dtype:
            raise TypeError(
                f"the cache holds {cache.v.dtype} keys and values but the layer now "
                f"computes in {dtype}: decode in the dtype of the prefill"
            )
        if capacity > cache.capacity:
            cache.grow(capacity)

    def prefill(self, x, cache, lengths=None):
        """Run a prompt through the layer into `cache`: x (batch, T, d) -> (batch, T, d).

        Row b holds lengths[b] prompt tokens (right-padded; all T without lengths) that continue
        the tokens the cache has seen (none for a new cache): one pass of the attention op,
        whose final state becomes the cache's, so a prompt prefilled in pieces gives the outputs
        and cache of one prefill. The update at padded positions is zero.
        """
        if not self.causal:
            raise ValueError("a decoding cache needs a causal layer")
        self._check_input(x, ("batch", "T", self.d))
        B, T, _ = x.shape
        lengths = check_lengths(lengths, B, T, x.device)
        if cache.initialized and cache.v.shape[0] != B:
            raise ValueError(f"the cache holds batch {cache.v.shape[0]}, x has batch {B}")
        u, v, z = self._uvz(x)
        update = self.to_out(self._attend_after_cache(u, v, z, cache, lengths))
        if lengths is not None:
            padded = torch.arange(T, device=x.device)[None, :] >= lengths[:, None]
            update = torch.where(padded[..., None], torch.zeros_like(update), update)
        return x + update

    def step(self, x, cache):
        """One token per sequence: x (batch, d) -> (batch, d), at each sequence's own position
        (cache.position); updates cache in place.

        quad = sum_{j in chunk, j <= t} relu(quad_scale <q_t, k_j> + b(t - j))^2 v_j over the
        buffered chunk; lin = lin_scale q_lin_t^T state (completed chunks only). When a
        sequence's chunk reaches C tokens its k_lin^T v is folded into its state. Work per
        token: O(C (S + E) + S E + d (2e + s + e)), independent of the tokens before.
        The attention is one call of `flash_kernels.flash_attention_decode` (roles and gate
        fused; with RoPE, `mixed_chunk_decode` on rotated roles): one kernel launch on a GPU,
        static shapes and no host-device sync, so the step can be captured in a CUDA graph.
        Inference only (the cache is updated in place); run it under torch.no_grad().
        """
        if not self.causal:
            raise ValueError("step() decodes causal layers only")
        self._check_input(x, ("batch", self.d))
        B = x.shape[0]
        u, v, z = self._uvz(x)  # (B, e), (B, e), (B, s)
        self._prepare_cache(cache, B, 1, v.dtype, v.device)
        options = dict(
            rel_bias=self._rel_bias(cache.bias_chunk),
            quad_scale=self.quad_scale,
            lin_scale=self.lin_scale,
            backend=self.backend,
        )
        if self.rope is None:
            gamma, beta = self.scale_offset.gamma, self.scale_offset.beta
            y = flash_attention_decode(z, gamma, beta, v, cache, u=u, **options)
        else:
            # (B, S) rows: the rotation takes B as its token axis, each at its own position.
            roles = self._roles(z, cache.position)
            q_lin, k_lin = roles[2:] if self.linear else (None, None)
            y = u * mixed_chunk_decode(roles[0], roles[1], q_lin, k_lin, v, cache, **options)
        if self.chunk_size is None:  # the bound one-chunk buffers grow by (chunked: unused)
            cache.max_tokens += 1
        return x + self.to_out(y)


class GAU(GatedAttentionLayer):
    """Gated Attention Unit with full quadratic attention (FLASH paper, section 2); the paper's
    FLASH-Quad is a stack of these (FLASHLM(layer="gau")).

    One chunk as long as the sequence (chunk_size=None), roles (quad_q, quad_k):
        a_ij = relu(quad_scale <q_i, k_j> + b(i - j))^2   (j <= i when causal)
        out_i = sum_j a_ij v_j

    quad_scale defaults to 1 / max_len, a constant standing for the paper's 1 / n at the training
    length: dividing by the actual length would make causal outputs depend on later tokens and
    break decoding. The learned relative bias has one weight per offset up to max_len - 1
    (farther offsets share the last one). Decoding (step) is supported and is quadratic in the
    sequence length by nature: token t attends to all t tokens before it.

    Args: d (model width); s (shared z width, 128 in the paper); expansion (e = expansion * d);
    causal; rel_pos (None, "learned" or "t5"); rope (RoPE on the roles); norm ("scalenorm" or
    "layernorm"); backend of the attention op ("auto", "triton", "torch", "reference").
    """

    def __init__(
        self,
        d,
        *,
        s=128,
        expansion=2,
        causal=True,
        max_len=512,
        rel_pos="learned",
        rope=False,
        norm="scalenorm",
        quad_scale=None,
        backend="auto",
        t5_buckets=32,
        t5_max_distance=128,
    ):
        check_int("max_len", max_len, minimum=1)
        super().__init__(
            d,
            s=s,
            expansion=expansion,
            chunk_size=None,
            linear=False,
            causal=causal,
            rel_pos=rel_pos,
            rope=rope,
            norm=norm,
            quad_scale=quad_scale if quad_scale is not None else 1.0 / max_len,
            lin_scale=None,
            max_distance=max_len,
            backend=backend,
            t5_buckets=t5_buckets,
            t5_max_distance=t5_max_distance,
        )
        self.max_len = max_len


class FLASH(GatedAttentionLayer):
    """FLASH layer: a GAU with mixed chunk attention, linear in the sequence length (section 3).

    Chunks of C tokens; four roles (quad_q, quad_k, lin_q, lin_k) of the shared z:
        quad_i = sum_{j in chunk(i), j <= i} relu(quad_scale <qq_i, kq_j> + b(i - j))^2 v_j
        lin_i  = lin_scale ql_i^T sum_{chunks g before chunk(i)} sum_{j in g} kl_j v_j^T
                 (all chunks when not causal)
        out_i  = u_i * (quad_i + lin_i)
    quad_scale = lin_scale = 1 / C by default (the paper's code). linear=False keeps only the
    chunk-local quadratic part (no linear part; this is not the paper's FLASH-Quad, which is a
    stack of GAU layers: full quadratic attention). The learned relative bias has one weight
    per offset within a chunk.

    Decoding (step) keeps the float32 S x E state of the completed chunks and the current chunk's
    keys and values: work per token is bounded by C and S x E.
    Args as GAU, plus chunk_size (C), linear and lin_scale.
    """

    def __init__(
        self,
        d,
        *,
        s=128,
        expansion=2,
        chunk_size=256,
        linear=True,
        causal=True,
        rel_pos="learned",
        rope=False,
        norm="scalenorm",
        quad_scale=None,
        lin_scale=None,
        backend="auto",
        t5_buckets=32,
        t5_max_distance=128,
    ):
        if chunk_size is None:
            raise ValueError(
                "FLASH needs a positive chunk_size (use GAU for full attention), got None"
            )
        check_int("chunk_size", chunk_size, minimum=1)
        super().__init__(
            d,
            s=s,
            expansion=expansion,
            chunk_size=chunk_size,
            linear=linear,
            causal=causal,
            rel_pos=rel_pos,
            rope=rope,
            norm=norm,
            quad_scale=quad_scale,
            lin_scale=lin_scale,
            max_distance=chunk_size,
            backend=backend,
            t5_buckets=t5_buckets,
            t5_max_distance=t5_max_distance,
        )
