"""FLASHCache: transformers' Cache holding each FLASH layer's decoding cache."""

import torch
from transformers.cache_utils import Cache

from ..nn import AttentionCache


class FLASHCache(Cache):
    """The decoding state of a FLASH model for `generate`: one `flash_kernels.nn.AttentionCache`
    per layer (a `flash_kernels.DecodeCache`: per sequence the float32 S x E state of its
    completed chunks plus its current chunk's keys and values, at most C tokens), in `layers`.

    Each sequence sits at its own position (`layers[i].position`, real tokens only: padding
    never enters the cache), so rows of a left-padded batch decode exactly as if each were
    alone. `seen_tokens` counts the input columns consumed, padding included: that is what
    transformers' `get_seq_length` means (generate slices the new tokens with it).

    Beam search and batch changes reorder the sequences (`reorder_cache`,
    `batch_select_indices`, `batch_repeat_interleave`). A FLASH state cannot be rolled back
    (completed chunks are summed into it), so `crop` raises.
    """

    is_compileable = False  # its prefill and step are eager Python over the layers
    is_croppable = False

    def __init__(self, num_layers):
        super().__init__(layers=[AttentionCache() for _ in range(num_layers)])
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx=0):
        """Input columns consumed so far (padding included), the same for every layer."""
        return self.seen_tokens

    def get_max_length(self, layer_idx=None):
        """-1: no maximum (FLASH layers keep one chunk whatever the sequence's length)."""
        return -1

    @property
    def batch_size(self):
        """Sequences held, or -1 before the first forward."""
        first = self.layers[0] if self.layers else None
        return -1 if first is None or not first.initialized else first.position.shape[0]

    def reorder_cache(self, beam_idx):
        """Beam search: sequence i continues the old sequence beam_idx[i]."""
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices):
        """Keep the sequences `indices`, in that order (repeats allowed)."""
        for layer in self.layers:
            layer.select_batch(indices)

    def batch_repeat_interleave(self, repeats):
        """Repeat every sequence `repeats` times in place of itself (a, a, b, b, ...)."""
        if self.batch_size > 0:
            device = self.layers[0].position.device
            indices = torch.arange(self.batch_size, device=device).repeat_interleave(repeats)
            self.batch_select_indices(indices)

    def crop(self, *args, **kwargs):
        raise NotImplementedError(
            "a FLASH cache cannot be cropped: the keys and values of "
            "completed chunks are summed into its state, which cannot "
            "give a token back (no assisted decoding or rollback)"
        )

    def reset(self):
        """Back to no tokens seen (the layers' caches are allocated again on first use)."""
        self.layers = [AttentionCache() for _ in self.layers]
        self.seen_tokens = 0
