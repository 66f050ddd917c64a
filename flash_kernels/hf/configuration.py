"""FLASHConfig: a FLASHLM's keyword arguments as a transformers configuration."""

from transformers import PretrainedConfig

#: FLASHLM's keyword arguments, all stored under the same names in FLASHConfig.
FLASHLM_OPTIONS = (
    "vocab_size",
    "d",
    "depth",
    "layer",
    "s",
    "expansion",
    "chunk_size",
    "linear",
    "causal",
    "rel_pos",
    "rope",
    "norm",
    "max_len",
    "quad_scale",
    "lin_scale",
    "backend",
    "init_std",
)


class FLASHConfig(PretrainedConfig):
    """The configuration of `FLASHModel` / `FLASHForCausalLM`: every `flash_kernels.nn.FLASHLM`
    keyword argument under the same name and with the same default (vocab_size, which FLASHLM
    requires, defaults to 256: bytes), plus transformers' usual settings.

    `hidden_size` and `num_hidden_layers` (transformers' names, which generic tools read) are
    aliases of d and depth, accepted as arguments too. The output head is always tied to the
    embedding (FLASHLM has no other head), so `tie_word_embeddings=False` is an error; so is a
    causal LM built from `causal=False` (FLASHForCausalLM says so; FLASHModel takes it).
    `use_cache`: whether a causal model in eval mode returns a decoding cache by default.
    """

    model_type = "flash"
    attribute_map = {"hidden_size": "d", "num_hidden_layers": "depth"}
    # Output fields left out of evaluation predictions (Trainer): the cache (both names).
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size=256,
        d=512,
        depth=8,
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
        use_cache=True,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=True,
        **kwargs,
    ):
        if not tie_word_embeddings:
            raise ValueError(
                "tie_word_embeddings=False is not supported: FLASHLM's output head is "
                "its embedding matrix (logits = norm(h) E^T), there is no separate "
                "head to untie"
            )
        self.vocab_size = vocab_size
        self.d = kwargs.pop("hidden_size", d)
        self.depth = kwargs.pop("num_hidden_layers", depth)
        self.layer, self.s, self.expansion, self.chunk_size = layer, s, expansion, chunk_size
        self.linear, self.causal, self.rel_pos, self.rope = linear, causal, rel_pos, rope
        self.norm, self.max_len = norm, max_len
        self.quad_scale, self.lin_scale = quad_scale, lin_scale
        self.backend, self.init_std = backend, init_std
        self.use_cache = use_cache
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=True,
            **kwargs,
        )

    def flashlm_kwargs(self):
        """The keyword arguments of the FLASHLM this configuration describes."""
        return {name: getattr(self, name) for name in FLASHLM_OPTIONS}
