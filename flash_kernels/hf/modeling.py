"""FLASHModel and FLASHForCausalLM: a `flash_kernels.nn.FLASHLM` as transformers models.

The model holds a FLASHLM (`model.model.lm`: embedding, FLASH/GAU layers, final norm; the head is
the embedding) and runs its layers; this module only translates transformers' conventions:

- attention_mask (1 = real token, 0 = padding): FLASH's output depends on where the chunks
  start, so padding is not masked in place but removed: each row's real tokens are moved to the
  front (in order), run as a right-padded batch whose padding is masked (`key_padding_mask`, or
  the prefill's `lengths`), and the outputs moved back. A left-padded row thus gives exactly
  the outputs of its tokens alone, and its positions are those transformers computes
  (attention_mask.cumsum(-1) - 1).
- the cache: a `FLASHCache` of per-layer decoding caches. A forward with a cache prefills the
  new tokens through each layer's op with `output_final_state` (`FLASH.prefill`), or, for one
  token per row, runs the fused decoding step (`FLASH.step`).
- packed documents: `cu_seqlens` (as the op takes it), or position_ids that restart at each
  document (what transformers' DataCollatorWithFlattening produces).
"""

import functools

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ..nn import FLASHLM
from .cache import FLASHCache
from .configuration import FLASHConfig

#: The output classes' field for the cache: transformers 5 calls it "cache" (accepting the old
#: name with a deprecation warning), transformers 4 "past_key_values".
CACHE_FIELD = (
    "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
)

#: Targets with this label are left out of the loss (transformers' and PyTorch's convention).
IGNORE_INDEX = -100


def real_tokens_first(attention_mask):
    """(order, lengths) of a (B, T) attention mask (nonzero = real token): x.gather(1, order)
    puts each row's real tokens first, in their order, then its padding; lengths (B,) counts
    the real tokens. No host-device sync."""
    padding = attention_mask == 0
    order = torch.sort(padding.to(torch.uint8), dim=1, stable=True).indices
    return order, (~padding).sum(dim=1)


def gather_rows(x, order):
    """x (B, T, W) with row b's tokens taken in the order order[b] (B, T)."""
    return x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))


def documents_from_position_ids(position_ids, batch):
    """cu_seqlens over the flattened (batch * T) tokens when position_ids ((batch or 1, T))
    restart somewhere (a position other than the previous one + 1 starts a document), else None.
    Reads the positions (a device sync)."""
    position_ids = position_ids.expand(batch, -1)
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if not bool(starts[:, 1:].any()):
        return None
    first_tokens = starts.reshape(-1).nonzero()[:, 0]
    return torch.cat([first_tokens, first_tokens.new_full((1,), starts.numel())])


class FLASHPreTrainedModel(PreTrainedModel):
    """Settings shared by the FLASH models (configuration class, weight-name prefix,
    gradient checkpointing)."""

    config_class = FLASHConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["FLASH", "GAU"]

    def _init_weights(self, module):
        """Nothing: FLASHLM's modules initialise their weights when built (the embedding with
        init_std, the layers as `flash_kernels.nn` defines), which transformers' generic
        re-initialisation would replace; loading fills every weight from the checkpoint."""


class FLASHModel(FLASHPreTrainedModel):
    """The FLASHLM body: embedding, layers and final norm. `forward` returns the final-normed
    hidden states (BaseModelOutputWithPast) and, for a causal model, a `FLASHCache`."""

    def __init__(self, config):
        super().__init__(config)
        self.lm = FLASHLM(**config.flashlm_kwargs())
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.lm.embed

    def set_input_embeddings(self, value):
        self.lm.embed = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        output_hidden_states=None,
        output_attentions=None,
        return_dict=None,
        cu_seqlens=None,
        max_seqlen=None,
        cache=None,
        **kwargs,
    ):
        """input_ids (B, T) or inputs_embeds (B, T, d) -> last_hidden_state (B, T, d) and the
        cache (`past_key_values`, or `cache` as transformers 5 names it).

        attention_mask: (B, T), or (B, cached + T) with a cache (its last T columns mask the new
            tokens); padded positions never influence real tokens and get meaningless outputs.
        use_cache: return a FLASHCache (default: config.use_cache for a causal model in eval
            mode, or whenever a cache is passed). A FLASHCache continues the sequences it holds.
        cu_seqlens, max_seqlen: packed documents along T (every row split alike), as the op
            takes them; `cu_seq_lens_q` / `max_length_q` (flash-attention's names, which
            DataCollatorWithFlattening(return_flash_attn_kwargs=True) produces) are read too.
        position_ids: read only to find packed documents, without attention_mask or a cache:
            a token whose position is not its predecessor's + 1 starts a document (rows are
            then packed into one). FLASH computes its own positions (RoPE restarts with each
            document and starts after padding).
        Other keyword arguments transformers passes (cache_position, num_items_in_batch, ...)
        are accepted and unused. output_attentions and output_hidden_states cannot be given
        (the fused op forms no attention matrix; hidden states are not collected).
        """
        if output_attentions or output_hidden_states:
            raise ValueError(
                "FLASH models return neither attentions (the fused op never forms "
                "an attention matrix) nor per-layer hidden states"
            )
        cache = self._one_cache(past_key_values, cache)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        h = self.lm.embed(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = h.shape[:2]
        if attention_mask is not None and (
            attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < T
        ):
            raise ValueError(
                f"attention_mask must have shape ({B}, T) with T >= {T} (the "
                f"tokens so far), got {tuple(attention_mask.shape)}"
            )
        cu_seqlens = cu_seqlens if cu_seqlens is not None else kwargs.get("cu_seq_lens_q")
        max_seqlen = max_seqlen if max_seqlen is not None else kwargs.get("max_length_q")
        packed_rows = False
        if (
            cu_seqlens is None
            and position_ids is not None
            and attention_mask is None
            and cache is None
            and not use_cache
        ):
            cu_seqlens = documents_from_position_ids(position_ids, B)
            packed_rows = cu_seqlens is not None
        if use_cache is None:
            use_cache = cache is not None or (
                self.config.use_cache
                and self.config.causal
                and not self.training
                and cu_seqlens is None
            )
        if use_cache:
            if cu_seqlens is not None:
                raise ValueError(
                    "a decoding cache does not take packed documents (cu_seqlens or "
                    "restarting position_ids): pass use_cache=False"
                )
            cache = cache if cache is not None else FLASHCache(len(self.lm.layers))
            h = self._decode(h, attention_mask, cache)
        else:
            if cache is not None:
                raise ValueError("a cache was passed with use_cache=False")
            if attention_mask is not None and cu_seqlens is not None:
                raise ValueError(
                    "attention_mask and packed documents (cu_seqlens) cannot be "
                    "combined: packed rows hold no padding"
                )
            if packed_rows:
                h = self._full(h.reshape(1, B * T, -1), None, cu_seqlens, None).reshape(B, T, -1)
            else:
                h = self._full(h, attention_mask, cu_seqlens, max_seqlen)
        output = BaseModelOutputWithPast(
            last_hidden_state=self.lm.final_norm(h), **{CACHE_FIELD: cache if use_cache else None}
        )
        return output if return_dict is not False else output.to_tuple()

    @staticmethod
    def _one_cache(past_key_values, cache):
        """The cache, under either name; only a FLASHCache fits."""
        if past_key_values is not None and cache is not None:
            raise ValueError("pass the cache as past_key_values or as cache, not both")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, FLASHCache):
            raise TypeError(
                f"FLASH decodes with a FLASHCache (each layer's state of completed "
                f"chunks and its current chunk's keys and values), got "
                f"{type(cache).__name__}: pass none and the model makes one"
            )
        return cache

    def _full(self, h, attention_mask, cu_seqlens, max_seqlen):
        """Every layer over whole rows (training, scoring, generate without a cache)."""
        order = padding = None
        if attention_mask is not None:
            order, lengths = real_tokens_first(attention_mask[:, -h.shape[1] :])
            h = gather_rows(h, order)
            padding = torch.arange(h.shape[1], device=h.device) >= lengths[:, None]
        for layer in self.lm.layers:
            run = functools.partial(layer, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
            if self.gradient_checkpointing and self.training:
                h = self._gradient_checkpointing_func(run, h, padding)
            else:
                h = run(h, padding)
        return h if order is None else gather_rows(h, order.argsort(dim=1))

    def _decode(self, h, attention_mask, cache):
        """The new tokens h (B, T, d) after those the cache holds: one fused decoding step per
        layer for a single real token per row, else one prefill per layer (each row's real
        tokens, padding left out)."""
        T = h.shape[1]
        new_mask = None if attention_mask is None else attention_mask[:, -T:]
        if T == 1 and (new_mask is None or bool(new_mask.all())):
            x = h[:, 0]
            for layer, layer_cache in zip(self.lm.layers, cache.layers):
                x = layer.step(x, layer_cache)
            h = x[:, None]
        else:
            order = lengths = None
            if new_mask is not None:
                order, lengths = real_tokens_first(new_mask)
                h = gather_rows(h, order)
            for layer, layer_cache in zip(self.lm.layers, cache.layers):
                h = layer.prefill(h, layer_cache, lengths)
            if order is not None:
                h = gather_rows(h, order.argsort(dim=1))
        cache.seen_tokens += T
        return h


class FLASHForCausalLM(FLASHPreTrainedModel, GenerationMixin):
    """A causal FLASH language model for transformers: `generate` (greedy, sampling, beam search,
    left-padded batches), `Trainer`, `save_pretrained` / `from_pretrained`. Logits are the
    FLASHLM's: the final-normed hidden states times the embedding matrix (tied head).
    `from_flashlm` / `to_flashlm` convert from and to `flash_kernels.nn.FLASHLM`."""

    def __init__(self, config):
        if not config.causal:
            raise ValueError(
                "FLASHForCausalLM needs causal=True (a causal LM predicts each token "
                "from the tokens before it); FLASHModel takes causal=False"
            )
        super().__init__(config)
        self.model = FLASHModel(config)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls):
        """False: generate must not make a DynamicCache; the first forward makes a FLASHCache."""
        return False

    @classmethod
    def from_flashlm(cls, lm, **config_kwargs):
        """A model with a copy of `lm`'s weights, on its device and in its dtype.
        config_kwargs: transformers settings for the configuration (eos_token_id=...)."""
        config = FLASHConfig(**dict(lm.init_kwargs, backend=lm.backend), **config_kwargs)
        weight = lm.embed.weight
        model = cls(config).to(device=weight.device, dtype=weight.dtype)
        model.model.lm.load_state_dict(lm.state_dict())
        return model

    def to_flashlm(self):
        """A `flash_kernels.nn.FLASHLM` with a copy of this model's weights (same device and
        dtype), for the package's own generate, packing and context-parallel training."""
        weight = self.model.lm.embed.weight
        options = dict(self.config.flashlm_kwargs(), backend=self.model.lm.backend)
        lm = FLASHLM(**options).to(device=weight.device, dtype=weight.dtype)
        lm.load_state_dict(self.model.lm.state_dict())
        return lm

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_hidden_states=None,
        output_attentions=None,
        return_dict=None,
        cu_seqlens=None,
        max_seqlen=None,
        logits_to_keep=0,
        cache=None,
        **kwargs,
    ):
        """Logits (B, T, vocab_size) and, with labels (B, T), the next-token loss.

        The arguments mean what they mean for FLASHModel.forward. labels: position t's logits
        are scored against labels[:, t + 1]; IGNORE_INDEX (-100) targets are left out; the
        loss is the mean over the counted targets, or their sum divided by
        `num_items_in_batch` when the Trainer passes it (gradient accumulation).
        logits_to_keep: an int k > 0 computes the logits of the last k positions only
        (generate asks for 1).
        """
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
            cache=cache,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = hidden @ self.model.lm.embed.weight.t()  # the tied head
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, kwargs.get("num_items_in_batch"))
        output = CausalLMOutputWithPast(
            loss=loss, logits=logits, **{CACHE_FIELD: outputs.get(CACHE_FIELD)}
        )
        return output if return_dict is not False else output.to_tuple()


def causal_lm_loss(logits, labels, num_items_in_batch=None):
    """Cross-entropy of logits[:, t] against labels[:, t + 1], IGNORE_INDEX targets left out:
    the mean over the counted targets, or their sum / num_items_in_batch (computed in float32
    at least: half-precision logits are promoted)."""
    targets = labels[:, 1:].to(logits.device).reshape(-1)
    compute = torch.promote_types(logits.dtype, torch.float32)
    scores = logits[:, :-1].to(compute).reshape(targets.numel(), -1)
    if num_items_in_batch is None:
        return F.cross_entropy(scores, targets, ignore_index=IGNORE_INDEX)
    total = F.cross_entropy(scores, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / num_items_in_batch
