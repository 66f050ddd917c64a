"""flash_kernels.hf: FLASHLM as a transformers model, checked against FLASHLM and the full forward.

- The configuration holds FLASHLM's keyword arguments (same names and defaults); the model's
  logits equal FLASHLM's (float64, exactly: the same layers run), both ways of converting.
- Padding: a left-padded row gives the logits and generated tokens of its prompt alone, with the
  cache and without it (naive masking would not: checked, so the test can fail).
- generate: greedy equals FLASHLM.generate(temperature=0) and argmax decoding of the full forward
  at every step across chunk boundaries; greedy, sampling (one seed) and beam search give the
  same sequences with the cache and without it; sampled tokens lie in the full forward's top-k;
  beam scores equal the full forward's log-probabilities; eos and max_new_tokens.
- The Triton decode step (under the interpreter without a GPU) generates what the torch path does.
- save_pretrained / from_pretrained (safetensors, one tied matrix) in this and in a fresh process,
  bf16 loading, gradient checkpointing (the layers run again in the backward), torch.compile.
- Packed training: DataCollatorWithFlattening's position_ids, cu_seq_lens_q or cu_seqlens give
  the token-weighted mean of each document's loss computed alone.
- The Trainer example runs; `import flash_kernels` never imports transformers, and
  flash_kernels.hf without transformers says which extra to install.
"""

import inspect
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip(
    "transformers", reason='flash_kernels.hf needs transformers: pip install -e ".[hf]"'
)

from safetensors.torch import load_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    DataCollatorWithFlattening,
    DynamicCache,
)

from flash_kernels.core.environment import INTERPRETED_KERNELS  # noqa: E402
from flash_kernels.hf import FLASHCache, FLASHConfig, FLASHForCausalLM, FLASHModel  # noqa: E402
from flash_kernels.hf.configuration import FLASHLM_OPTIONS  # noqa: E402
from flash_kernels.hf.modeling import CACHE_FIELD  # noqa: E402
from flash_kernels.nn import FLASHLM  # noqa: E402
from tools.launch_recording import record_launches  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBPROCESS_ENV = dict(
    os.environ,
    PYTHONPATH=os.pathsep.join(
        [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    ),
)
V, D, S, C = 32, 16, 8, 4
PAD = 0
LENGTHS = [7, 3, 5]  # prompts of a left-padded batch: chunks of C = 4 start differently


def lively_lm(seed=0, dtype=torch.float64, **options):
    """A tiny FLASHLM (C = 4) whose weights are redrawn N(0, 0.6^2) and embedding N(0, 1): its
    next token depends on the context and on where the chunks start. (Freshly initialised, such
    a model repeats one token whatever precedes it, so a misaligned chunk would go unnoticed.)"""
    torch.manual_seed(seed)
    lm = FLASHLM(
        V, D, **{"depth": 2, "s": S, "chunk_size": C, "rope": True, "backend": "torch", **options}
    )
    with torch.no_grad():
        for parameter in lm.parameters():
            parameter.normal_(0, 0.6)
        lm.embed.weight.normal_(0, 1)
    return lm.to(dtype)


def hf_model(lm, **config):
    return FLASHForCausalLM.from_flashlm(lm, pad_token_id=PAD, **config).eval()


def prompts(lengths=LENGTHS, seed=1):
    """(list of 1-D prompts, left-padded (B, T), its attention mask, right-padded (B, T))."""
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(1, V, (n,), generator=gen) for n in lengths]
    T = max(lengths)
    left = torch.full((len(rows), T), PAD)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    right = torch.full((len(rows), T), PAD)
    for b, row in enumerate(rows):
        left[b, T - len(row) :], mask[b, T - len(row) :], right[b, : len(row)] = row, 1, row
    return rows, left, mask, right


def quiet_generate(model, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(*args, **kwargs)


# -- configuration and conversion ----------------------------------------------------------------


def test_config_holds_flashlm_options_and_refuses_what_it_cannot_honour():
    signature = inspect.signature(FLASHLM).parameters
    assert FLASHLM_OPTIONS == tuple(signature)
    defaults = FLASHConfig().flashlm_kwargs()  # FLASHLM's, vocab_size aside
    assert all(defaults[name] == signature[name].default for name in FLASHLM_OPTIONS[1:])
    config = FLASHConfig(hidden_size=48, num_hidden_layers=3, rope=True)
    assert (config.d, config.depth, config.hidden_size, config.num_hidden_layers) == (48, 3, 48, 3)
    assert config.tie_word_embeddings and config.model_type == "flash"
    again = AutoConfig.for_model(**config.to_dict())  # model_type "flash"
    assert type(again) is FLASHConfig and again.flashlm_kwargs() == config.flashlm_kwargs()
    with pytest.raises(ValueError, match="tie_word_embeddings=False"):
        FLASHConfig(tie_word_embeddings=False)
    encoder = FLASHConfig(vocab_size=V, d=D, depth=1, s=S, chunk_size=C, causal=False)
    with pytest.raises(ValueError, match="causal=True"):
        FLASHForCausalLM(encoder)
    assert not FLASHModel(encoder).lm.causal


def test_logits_loss_and_conversion_equal_flashlm():
    lm = lively_lm()
    model = hf_model(lm)
    idx = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = lm(idx)
        full = model(idx, use_cache=False)
        prefilled = model(idx)  # eval mode: with a cache
        assert torch.equal(full.logits, expected)
        torch.testing.assert_close(prefilled.logits, expected, rtol=1e-12, atol=1e-12)
        assert isinstance(prefilled[CACHE_FIELD], FLASHCache)
        assert torch.equal(model.to_flashlm()(idx), expected)
        assert torch.equal(model(inputs_embeds=lm.embed(idx), use_cache=False).logits, expected)
        assert torch.equal(model(idx, use_cache=False, logits_to_keep=3).logits, expected[:, -3:])
        hidden = FLASHModel(model.config).to(torch.float64).eval()
        hidden.load_state_dict(model.model.state_dict())
        assert torch.equal(
            hidden(idx, use_cache=False).last_hidden_state @ lm.embed.weight.t(), expected
        )
        labels = idx.clone()
        labels[0, 4:7] = -100
        loss = model(idx, labels=labels, use_cache=False).loss
        keep = labels[:, 1:] != -100
        manual = F.cross_entropy(expected[:, :-1][keep], labels[:, 1:][keep])
        torch.testing.assert_close(loss, manual, rtol=1e-12, atol=0)
        summed = model(idx, labels=labels, use_cache=False, num_items_in_batch=7).loss
        torch.testing.assert_close(summed, manual * keep.sum() / 7, rtol=1e-12, atol=0)


def test_left_padded_rows_give_each_prompt_alone():
    """Logits at a left-padded row's real tokens equal its prompt's alone, with the cache
    (prefill) and without; masking padding in place (chunks misaligned) would not."""
    lm = lively_lm()
    model = hf_model(lm)
    rows, left, mask, _ = prompts()
    T = left.shape[1]
    with torch.no_grad():
        full = model(left, attention_mask=mask, use_cache=False).logits
        prefilled = model(left, attention_mask=mask, use_cache=True).logits
        for b, row in enumerate(rows):
            alone = lm(row[None])[0]
            torch.testing.assert_close(full[b, T - len(row) :], alone, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(prefilled[b, T - len(row) :], alone, rtol=1e-12, atol=1e-12)
        in_place = lm(left, key_padding_mask=mask == 0)  # row 2: 2 pads, chunks shifted
        assert not torch.allclose(in_place[2, T - 5 :], lm(rows[2][None])[0], atol=1e-3)
        bidirectional = lively_lm(causal=False)  # (padding after a token matters too)
        encoder = FLASHModel(FLASHConfig(**bidirectional.init_kwargs)).double().eval()
        encoder.lm.load_state_dict(bidirectional.state_dict())
        hidden = encoder(left, attention_mask=mask).last_hidden_state
        for b, row in enumerate(rows):
            torch.testing.assert_close(
                hidden[b, T - len(row) :],
                encoder(row[None]).last_hidden_state[0],
                rtol=1e-12,
                atol=1e-12,
            )


# -- generate ------------------------------------------------------------------------------------


def test_greedy_equals_flashlm_generate_and_argmax_of_the_full_forward():
    """A 5-token prompt and 14 new tokens (C = 4): the steps cross four chunk boundaries."""
    lm = lively_lm(seed=4)
    model = hf_model(lm)
    prompt = torch.randint(1, V, (2, 5), generator=torch.Generator().manual_seed(2))
    cached = quiet_generate(model, prompt, max_new_tokens=14, do_sample=False)
    uncached = quiet_generate(model, prompt, max_new_tokens=14, do_sample=False, use_cache=False)
    assert cached.shape == (2, 19)
    assert torch.equal(cached, lm.generate(prompt, 14, temperature=0))
    assert torch.equal(uncached, cached)
    with torch.no_grad():
        for t in range(5, 19):
            assert torch.equal(lm(cached[:, :t])[:, -1].argmax(-1), cached[:, t]), t
    assert len(set(cached[:, 5:].flatten().tolist())) > 4  # not one repeated token


@pytest.mark.parametrize("layer", ["flash", "gau"])
def test_left_padded_batch_generates_what_each_prompt_generates_alone(layer):
    lm = lively_lm(seed=3, layer=layer, max_len=16)
    model = hf_model(lm)
    rows, left, mask, right = prompts()
    T, n = left.shape[1], 10
    cached = quiet_generate(model, left, attention_mask=mask, max_new_tokens=n, do_sample=False)
    uncached = quiet_generate(
        model, left, attention_mask=mask, max_new_tokens=n, do_sample=False, use_cache=False
    )
    assert torch.equal(cached, uncached)
    reference = lm.generate(right, n, lengths=torch.tensor(LENGTHS), temperature=0)
    for b, row in enumerate(rows):
        alone = quiet_generate(model, row[None], max_new_tokens=n, do_sample=False)[0]
        assert torch.equal(cached[b, T:], alone[len(row) :]), b
        assert torch.equal(cached[b, T:], reference[b, len(row) : len(row) + n]), b
    # eos: each row stops at its first eos (then padding), as FLASHLM.generate does
    eos = int(cached[1, T + 3])
    stopped = quiet_generate(
        model, left, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=eos
    )
    expected = lm.generate(
        right, n, lengths=torch.tensor(LENGTHS), temperature=0, eos_token_id=eos, pad_token_id=PAD
    )
    assert stopped.shape[1] - T == expected.shape[1] - T <= n
    for b, row in enumerate(rows):
        steps = stopped.shape[1] - T
        assert torch.equal(stopped[b, T:], expected[b, len(row) : len(row) + steps]), b


def test_sampling_with_and_without_cache_under_one_seed():
    lm = lively_lm(seed=4)
    model = hf_model(lm)
    _, left, mask, _ = prompts()
    options = dict(
        attention_mask=mask, max_new_tokens=9, do_sample=True, top_k=3, top_p=0.9, temperature=0.7
    )
    torch.manual_seed(11)
    cached = quiet_generate(model, left, **options)
    torch.manual_seed(11)
    uncached = quiet_generate(model, left, use_cache=False, **options)
    assert torch.equal(cached, uncached)
    T = left.shape[1]
    with torch.no_grad():  # every sampled token is in the full forward's top 3
        for t in range(T, cached.shape[1]):
            grown = torch.cat([mask, torch.ones(3, t - T, dtype=torch.long)], dim=1)
            logits = model(cached[:, :t], attention_mask=grown, use_cache=False).logits[:, -1]
            top3 = logits.topk(3).indices
            assert (top3 == cached[:, t : t + 1]).any(dim=1).all(), t


def test_beam_search_with_and_without_cache_and_its_scores():
    """Beams reorder the cache (reorder_cache) every step; the winning sequences' scores
    (length_penalty=0: summed log-probabilities) equal the full forward's."""
    lm = lively_lm(seed=5)
    model = hf_model(lm)
    rows, left, mask, _ = prompts()
    T = left.shape[1]
    options = dict(
        attention_mask=mask,
        max_new_tokens=8,
        num_beams=3,
        num_return_sequences=2,
        do_sample=False,
        length_penalty=0.0,
        early_stopping=True,
        return_dict_in_generate=True,
        output_scores=True,
    )
    cached = quiet_generate(model, left, **options)
    uncached = quiet_generate(model, left, use_cache=False, **options)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores)
    with torch.no_grad():
        for i, sequence in enumerate(cached.sequences):
            row = rows[i // 2]
            alone = torch.cat([row, sequence[T:]])[None]
            logprobs = lm(alone)[0, :-1].float().log_softmax(-1)
            chosen = logprobs[len(row) - 1 :].gather(1, alone[0, len(row) :, None]).sum()
            torch.testing.assert_close(cached.sequences_scores[i], chosen, rtol=1e-4, atol=1e-4)
    assert not torch.equal(cached.sequences[0], cached.sequences[1])


def test_cache_batch_operations():
    """FLASHCache.batch_repeat_interleave / batch_select_indices: the next step's logits are
    those of caches prefilled with the repeated or selected prompts."""
    lm = lively_lm()
    model = hf_model(lm)
    _, left, mask, _ = prompts()
    token = torch.tensor([[5], [9], [2], [7], [1], [3]])
    with torch.no_grad():
        cache = model(left, attention_mask=mask)[CACHE_FIELD]
        cache.batch_repeat_interleave(2)
        assert cache.batch_size == 6 and cache.get_seq_length() == left.shape[1]
        fresh = model(
            left.repeat_interleave(2, 0),
            attention_mask=mask.repeat_interleave(2, 0),
            use_cache=True,
        )[CACHE_FIELD]
        step = dict(attention_mask=torch.ones(6, left.shape[1] + 1, dtype=torch.long))
        torch.testing.assert_close(
            model(token, past_key_values=cache, **step).logits,
            model(token, past_key_values=fresh, **step).logits,
            rtol=1e-12,
            atol=1e-12,
        )
        cache.batch_select_indices(torch.tensor([5, 0]))
        fresh.batch_select_indices(torch.tensor([5, 0]))
        step = dict(attention_mask=torch.ones(2, left.shape[1] + 2, dtype=torch.long))
        torch.testing.assert_close(
            model(token[:2], past_key_values=cache, **step).logits,
            model(token[:2], past_key_values=fresh, **step).logits,
            rtol=1e-12,
            atol=1e-12,
        )
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(1)


@pytest.mark.skipif(
    not INTERPRETED_KERNELS and not torch.cuda.is_available(),
    reason="the Triton backend needs CUDA or TRITON_INTERPRET=1",
)
def test_triton_decode_step_generates_what_the_torch_path_does():
    lm = lively_lm(seed=6, dtype=torch.float32, rope=False)
    reference = hf_model(lm)
    lm.backend = "triton"
    model = hf_model(lm)
    assert model.config.backend == "triton"
    _, left, mask, _ = prompts([5, 2])
    with record_launches() as launches:
        out = quiet_generate(model, left, attention_mask=mask, max_new_tokens=6, do_sample=False)
    kernels = [record.kernel_name for record in launches]
    assert kernels.count("mixed_chunk_decode_kernel") == 5 * len(lm.layers)  # 5 steps
    assert torch.equal(
        out, quiet_generate(reference, left, attention_mask=mask, max_new_tokens=6, do_sample=False)
    )


# -- saving, dtypes, training features -----------------------------------------------------------


def test_save_and_load_round_trip(tmp_path):
    lm = lively_lm(dtype=torch.float32)
    model = hf_model(lm, eos_token_id=3)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    assert sum(w.shape == (V, D) for w in weights.values()) == 1  # the tied matrix, once
    idx = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(idx, use_cache=False).logits
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
        assert type(loaded) is FLASHForCausalLM and loaded.config.eos_token_id == 3
        assert (loaded(idx, use_cache=False).logits - expected).abs().max() == 0
        base = AutoModel.from_pretrained(tmp_path)
        assert type(base) is FLASHModel
        hidden = base(idx, use_cache=False).last_hidden_state
        assert torch.equal(hidden @ base.lm.embed.weight.t(), expected)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            half = AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
        assert all(p.dtype == torch.bfloat16 for p in half.parameters())
        logits = half(idx, use_cache=False).logits
        assert logits.dtype == torch.bfloat16
        assert (logits.float() - expected).abs().max() < 0.05 * expected.abs().max()
    torch.save(idx, tmp_path / "idx.pt")
    code = (
        "import sys, torch; import flash_kernels.hf; from transformers import "
        "AutoModelForCausalLM; path = sys.argv[1]; "
        "model = AutoModelForCausalLM.from_pretrained(path); "
        "torch.save(model(torch.load(path + '/idx.pt'), use_cache=False).logits, "
        "path + '/logits.pt')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=SUBPROCESS_ENV,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


def test_gradient_checkpointing_runs_the_layers_again_with_equal_gradients():
    model = hf_model(lively_lm()).train()
    idx = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(0))
    calls = []
    for layer in model.model.lm.layers:  # a pre-hook: a recompute may stop before the end
        layer.register_forward_pre_hook(lambda *_: calls.append(1))

    def gradients():
        calls.clear()
        model.zero_grad()
        model(idx, labels=idx).loss.backward()
        return [p.grad.clone() for p in model.parameters()], len(calls)

    plain, plain_calls = gradients()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # renamed in transformers 5 (deprecated)
        model.gradient_checkpointing_enable()
    checkpointed, checkpointed_calls = gradients()
    assert (plain_calls, checkpointed_calls) == (2, 4)  # each layer recomputed in the backward
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_torch_compile_of_the_forward():
    model = hf_model(lively_lm(dtype=torch.float32))
    _, left, mask, _ = prompts()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        expected = model(left, attention_mask=mask, labels=left, use_cache=False)
        actual = compiled(left, attention_mask=mask, labels=left, use_cache=False)
    torch.testing.assert_close(actual.logits, expected.logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-6, atol=1e-6)


def test_packed_loss_is_the_token_weighted_mean_of_each_documents_loss():
    model = hf_model(lively_lm()).train()
    gen = torch.Generator().manual_seed(7)
    documents = [torch.randint(0, V, (n,), generator=gen).tolist() for n in (6, 1, 9, 4, 5)]
    losses, counts = [], []
    for document in documents[:1] + documents[2:]:  # a 1-token document has no target
        x = torch.tensor([document])
        losses.append(model(x, labels=x).loss * (len(document) - 1))
        counts.append(len(document) - 1)
    expected = sum(losses) / sum(counts)
    features = [{"input_ids": document} for document in documents]
    by_positions = DataCollatorWithFlattening(return_tensors="pt")(features)
    by_cu_seqlens = DataCollatorWithFlattening(
        return_tensors="pt", return_position_ids=False, return_flash_attn_kwargs=True
    )(features)
    lengths = torch.tensor([len(d) for d in documents])
    explicit = dict(
        input_ids=by_positions["input_ids"],
        labels=by_positions["labels"],
        cu_seqlens=torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
    )
    for batch in (by_positions, by_cu_seqlens, explicit):
        torch.testing.assert_close(model(**batch).loss, expected, rtol=1e-12, atol=1e-12)
    unpacked = model(by_positions["input_ids"], labels=by_positions["labels"]).loss
    assert (unpacked - expected).abs() > 1e-3  # documents attending each other differ


def test_errors_name_what_to_fix():
    model = hf_model(lively_lm())
    idx = torch.randint(0, V, (1, 6))
    with pytest.raises(TypeError, match="FLASHCache"):
        model(idx, past_key_values=DynamicCache())
    with pytest.raises(ValueError, match="attentions"):
        model(idx, output_attentions=True)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(1, T\) with T >= 6"):
        model(idx, attention_mask=torch.ones(1, 5))
    with pytest.raises(ValueError, match="packed documents"):
        model(idx, use_cache=True, cu_seqlens=torch.tensor([0, 2, 6]))
    with pytest.raises(ValueError, match="cannot be combined"):
        model(
            idx,
            attention_mask=torch.ones_like(idx),
            cu_seqlens=torch.tensor([0, 2, 6]),
            use_cache=False,
        )


# -- the example and the optional import ---------------------------------------------------------


def test_trainer_example_runs(tmp_path):
    """examples/hf_train.py --tiny: Trainer steps with falling validation loss printed, the model
    saved, reloaded with AutoModelForCausalLM (equal logits) and sampled with generate."""
    command = [
        sys.executable,
        os.path.join(ROOT, "examples", "hf_train.py"),
        "--tiny",
        "--steps",
        "3",
        "--threads",
        "1",
    ]
    result = subprocess.run(
        command,
        check=False,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
        env=SUBPROCESS_ENV,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout
    assert "     0 |         |   5." in output and "     3 |" in output, output
    assert "max logit difference from the trained model: 0.0e+00" in output, output
    assert "the marker '|>>>'" in output
    assert sorted(os.listdir(tmp_path / "examples_out" / "hf_train")) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "trainer",
    ]


def test_import_is_optional_and_names_the_extra():
    code = (
        "import sys, flash_kernels; assert 'transformers' not in sys.modules, 'imported'; "
        "sys.modules['transformers'] = None\n"
        "try:\n    import flash_kernels.hf\nexcept ImportError as error:\n    print(error)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=SUBPROCESS_ENV,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "install the 'hf' extra" in result.stdout and '".[hf]"' in result.stdout
