"""FLASHLM: a decoder (or encoder) language model made of GAU / FLASH layers."""

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from ..core.environment import cuda_graph_capturing
from ..core.validation import BACKENDS, check_int, is_bool, type_name
from .cache import check_lengths
from .layers import FLASH, GAU
from .norms import make_norm


class FLASHLM(nn.Module):
    """Token embedding, a stack of pre-norm GAU/FLASH layers (each x + layer(norm(x))), a final
    norm and an output head tied to the embedding:

        h_0 = E[idx];   h_l = layer_l(h_{l-1});   logits = norm(h_L) E^T

    Args:
        vocab_size, d, depth: vocabulary, model width, number of layers.
        layer: "flash" (mixed chunk attention, chunk_size C) or "gau" (full quadratic attention:
            the paper's FLASH-Quad).
        s, expansion, causal, rel_pos, rope, norm, quad_scale, lin_scale, backend: passed to
            every layer (see FLASH and GAU); chunk_size and linear to FLASH layers, max_len to
            GAU layers (their constant quad_scale 1/max_len and learned bias range).
        init_std: the embedding's initial standard deviation.

    `forward(idx)` gives logits for every position; `prefill`, `step` and `generate` decode
    incrementally with per-layer `AttentionCache`s and agree with the forward.
    `init_kwargs`: the arguments the model was built with, by name (FLASHLM(**lm.init_kwargs)
    builds a model of the same shape), for wrappers that store a model's configuration.
    """

    def __init__(
        self,
        vocab_size,
        d=512,
        depth=8,
        *,
        layer="flash",
        s=128,
        expansion=2,
        chunk_size=256,
        linear=True,
        causal=True,
        rel_pos="learned",
        rope=False,
        norm="scalenorm",
        max_len=512,
        quad_scale=None,
        lin_scale=None,
        backend="auto",
        init_std=0.02,
    ):
        super().__init__()
        check_int("vocab_size", vocab_size, minimum=1)
        check_int("d", d, minimum=1)
        check_int("depth", depth, minimum=0)
        self.init_kwargs = dict(
            vocab_size=vocab_size,
            d=d,
            depth=depth,
            layer=layer,
            s=s,
            expansion=expansion,
            chunk_size=chunk_size,
            linear=linear,
            causal=causal,
            rel_pos=rel_pos,
            rope=rope,
            norm=norm,
            max_len=max_len,
            quad_scale=quad_scale,
            lin_scale=lin_scale,
            backend=backend,
            init_std=init_std,
        )
        self.vocab_size, self.d, self.causal = vocab_size, d, causal
        self.embed = nn.Embedding(vocab_size, d)
        nn.init.normal_(self.embed.weight, std=init_std)
        common = dict(
            s=s,
            expansion=expansion,
            causal=causal,
            rel_pos=rel_pos,
            rope=rope,
            norm=norm,
            quad_scale=quad_scale,
            backend=backend,
        )
        if layer == "flash":
            make, options = FLASH, dict(chunk_size=chunk_size, linear=linear, lin_scale=lin_scale)
        elif layer == "gau":
            if lin_scale is not None:
                raise ValueError("lin_scale applies to FLASH layers only (GAU has no linear part)")
            make, options = GAU, dict(max_len=max_len)
        else:
            raise ValueError(f"layer must be 'flash' or 'gau', got {layer!r}")
        self.layers = nn.ModuleList(make(d, **options, **common) for _ in range(depth))
        self.final_norm = make_norm(norm, d)

    @property
    def backend(self):
        return self.layers[0].backend if len(self.layers) else "auto"

    @backend.setter
    def backend(self, value):
        """Set the attention backend of every layer ("auto", "triton", "torch", "reference")."""
        if value not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {value!r}")
        for layer in self.layers:
            layer.backend = value

    def _check_tokens(self, name, idx, dims):
        """idx is an integer tensor of `dims` dims on the model's device with ids in
        [0, vocab_size). The range check reads the ids back (a device sync); it is skipped
        under torch.compile. Without it, a bad id is a raw IndexError on a CPU and a
        device-side assert, which ends the CUDA context, on a GPU."""
        shape = "(batch, T)" if dims == 2 else "(batch,)"
        if not isinstance(idx, torch.Tensor):
            raise TypeError(
                f"{name} must be a torch.Tensor of token ids {shape}, got {type_name(idx)}"
            )
        if idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must hold token ids as int64 or int32, got {idx.dtype}")
        if idx.dim() != dims:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(idx.shape)}")
        if idx.device != self.embed.weight.device:
            raise ValueError(
                f"{name} is on {idx.device} but the model is on {self.embed.weight.device}"
            )
        if idx.numel() and not torch.compiler.is_compiling():
            outside = (idx < 0) | (idx >= self.vocab_size)
            if outside.any():
                bad = idx[outside][0].item()
                raise ValueError(
                    f"{name} holds token id {bad}, outside [0, vocab_size) = [0, {self.vocab_size})"
                )

    def _head(self, h):
        return self.final_norm(h) @ self.embed.weight.t()  # tied output head

    def forward(
        self,
        idx,
        key_padding_mask=None,
        caches=None,
        *,
        cu_seqlens=None,
        max_seqlen=None,
        cp_group=None,
        start=None,
    ):
        """idx: (batch, T) token ids -> logits (batch, T, vocab_size).

        key_padding_mask: optional (batch, T) bool, True at padded tokens (their logits are
            meaningless). caches: optional list of caches (one per layer) to prefill (see
            `prefill`). cu_seqlens, max_seqlen: documents packed along T (training on packed
            sequences): no attention crosses a document boundary, positions restart at each.
        cp_group, start: context parallelism: idx is this rank's slice of the sequences,
            starting at position `start` (see FLASH.forward; FLASH layers only; start is
            refused with cu_seqlens, whose positions restart at each document). The logits
            are the whole-sequence model's on the slice; parameter gradients are this rank's
            partials (all-reduce them with a sum, and normalise the loss by the number of
            tokens of all ranks).
        """
        self._check_tokens("idx", idx, 2)
        h = self.embed(idx)
        for i, layer in enumerate(self.layers):
            h = layer(
                h,
                key_padding_mask=key_padding_mask,
                cache=None if caches is None else caches[i],
                cu_seqlens=cu_seqlens,
                max_seqlen=max_seqlen,
                cp_group=cp_group,
                start=start,
            )
        return self._head(h)

    def loss(self, idx, targets, *, cu_seqlens=None, max_seqlen=None):
        """Mean next-token cross-entropy of the logits for idx against targets (batch, T)."""
        logits = self(idx, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return F.cross_entropy(logits.float().reshape(-1, self.vocab_size), targets.reshape(-1))

    # -- incremental decoding -------------------------------------------------------------------

    def new_caches(self):
        return [layer.new_cache() for layer in self.layers]

    def _check_caches(self, caches):
        if not isinstance(caches, (list, tuple)) or len(caches) != len(self.layers):
            raise ValueError(
                f"caches must be a list of {len(self.layers)} layer caches "
                f"(model.new_caches() or prefill's), got {type_name(caches)}"
                + (f" of length {len(caches)}" if isinstance(caches, (list, tuple)) else "")
            )

    def prefill(self, idx, caches=None, *, lengths=None):
        """One forward pass over prompts (batch, T) -> (logits (batch, T, vocab), caches).

        Each layer's attention runs once over the prompts and its final state becomes the
        cache (no token loop). lengths: optional (batch,) prompt lengths of right-padded rows
        (row b's prompt is idx[b, :lengths[b]]; logits at padded positions are meaningless);
        each sequence then continues from its own position. Given caches, idx continues the
        prompts they hold: prompts prefilled in pieces give the logits and caches of one
        prefill.
        """
        if not self.causal:
            raise ValueError("decoding needs a causal model")
        self._check_tokens("idx", idx, 2)
        caches = self.new_caches() if caches is None else caches
        self._check_caches(caches)
        lengths = check_lengths(lengths, idx.shape[0], idx.shape[1], idx.device)
        h = self.embed(idx)
        for layer, cache in zip(self.layers, caches):
            h = layer.prefill(h, cache, lengths)
        return self._head(h), caches

    def step(self, token, caches):
        """One token per sequence: token (batch,) -> logits (batch, vocab) for the next one.

        Each sequence is at its own position (its caches'). Static shapes, no host-device
        sync: the step can be captured in a CUDA graph (torch.cuda.graph, or
        torch.compile(mode="reduce-overhead")); while a graph is being captured the token ids
        are not range-checked (that reads them back).
        """
        if not self.causal:
            raise ValueError("decoding needs a causal model")
        if not cuda_graph_capturing():
            self._check_tokens("token", token, 1)
        h = self.embed(token)
        for layer, cache in zip(self.layers, caches):
            h = layer.step(h, cache)
        return self._head(h)

    @torch.no_grad()
    def generate(
        self,
        idx,
        max_new_tokens,
        temperature=1.0,
        top_k=None,
        generator=None,
        *,
        lengths=None,
        eos_token_id=None,
        pad_token_id=None,
    ):
        """Continue each prompt by up to max_new_tokens sampled tokens.

        idx: (batch, T >= 1) prompts. lengths: optional (batch,) prompt lengths for prompts of
        different lengths, right-padded: row b's prompt is idx[b, :lengths[b]] (the rest of the
        row is ignored). Every prompt runs through one prefill; then each step decodes one token
        per sequence, each at its own position.
        eos_token_id: a sequence that samples it stops (the eos is kept); generation ends when
        every sequence has stopped or after max_new_tokens steps.
        pad_token_id: fills what follows a sequence's end (default: eos_token_id, else 0).

        Returns (batch, T + steps) token ids, steps <= max_new_tokens the number of decoding
        steps run: row b is its prompt, its new tokens (through the eos, if sampled), then
        pad_token_id. Without lengths and eos_token_id that is idx followed by max_new_tokens
        tokens per row. temperature=0 picks the most likely token; top_k keeps the k most
        likely before sampling. Each row gets the tokens it would get generated alone
        (greedy; sampling draws from one generator for the whole batch).
        """
        check_int("max_new_tokens", max_new_tokens, minimum=0)
        check_sampling(temperature, top_k)
        self._check_tokens("idx", idx, 2)
        B, T = idx.shape
        if T < 1:
            raise ValueError(f"idx must have shape (batch, T) with T >= 1, got {tuple(idx.shape)}")
        for name, value in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
            if value is not None:
                check_int(name, value, minimum=0)
                if value >= self.vocab_size:
                    raise ValueError(
                        f"{name} must be a token id below vocab_size "
                        f"({self.vocab_size}), got {value}"
                    )
        given_lengths = check_lengths(lengths, B, T, idx.device, minimum=1)
        prompt_lengths = (
            given_lengths
            if given_lengths is not None
            else torch.full((B,), T, dtype=torch.long, device=idx.device)
        )
        pad = pad_token_id if pad_token_id is not None else (eos_token_id or 0)

        caches = self.new_caches()
        for cache in caches:  # one-chunk (GAU) buffers: no regrowth mid-way
            cache.reserve(T + max_new_tokens)
        logits, caches = self.prefill(idx, caches, lengths=given_lengths)
        logits = logits.gather(
            1, (prompt_lengths - 1).view(B, 1, 1).expand(B, 1, logits.shape[-1])
        )[:, 0]
        prompt = torch.arange(T, device=idx.device)[None, :] < prompt_lengths[:, None]
        out = torch.cat(
            [
                torch.where(prompt, idx, torch.full_like(idx, pad)),
                idx.new_full((B, max_new_tokens), pad),
            ],
            dim=1,
        )
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        steps = 0
        for i in range(max_new_tokens):
            token = sample_next(logits, temperature=temperature, top_k=top_k, generator=generator)
            token = torch.where(done, pad, token).to(idx.dtype)
            out.scatter_(1, (prompt_lengths + i)[:, None], token[:, None])
            steps = i + 1
            if eos_token_id is not None:
                done |= token == eos_token_id
                if bool(done.all()):  # a sync per step, only when stopping is possible
                    break
            if i + 1 < max_new_tokens:
                logits = self.step(token, caches)
        return out[:, : T + steps]


def sample_next(logits, *, temperature=1.0, top_k=None, generator=None):
    """A token per row of logits (batch, vocab): argmax when temperature == 0, else a sample of
    softmax(logits / temperature) restricted to the top_k largest logits (if top_k is given)."""
    check_sampling(temperature, top_k)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        k = min(int(top_k), logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def check_sampling(temperature, top_k):
    """temperature: a finite real >= 0 (a negative one would sample the inverted distribution);
    top_k: None or a positive int."""
    if is_bool(temperature) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a real number >= 0, got {type_name(temperature)}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(
            f"temperature must be a finite number >= 0 (0 picks the most likely "
            f"token), got {temperature}"
        )
    if top_k is not None:
        check_int("top_k", top_k, minimum=1)
