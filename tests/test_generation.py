"""The decode loop inside transformers' `generate`: the same tokens, scores, stopping and cache as transformers'
own loop for the settings users pass every day; fallbacks logged; every padding layout."""

import logging

import pytest
import torch

import patchkit
from patchkit import architectures as A
from patchkit import generation
from patchkit.parity import tiny_model, text_vocab
from .families import BUILTIN

FAMILIES = BUILTIN
NEW = 24  # longer than the tiny sliding windows (8): tokens past the window are decoded


def prompts(vocab, layout="left", batch=3, length=12, seed=0):
    """Random prompts and their mask: `none` (no padding), `left` (two lengths), `right` (the `tril` masks of
    transformers' generation tests: row i keeps its first length - batch + i + 1 tokens, one row only 2)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if layout == "left" and batch > 1:
        mask[1, :3] = 0
        mask[-1, :5] = 0
    elif layout == "right" and batch > 1:
        mask = torch.tril(torch.ones(batch, length, dtype=torch.long), diagonal=length - batch)
        mask[0, 2:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def both(model, ids, **kwargs):
    """transformers' own `generate` (the model unpatched) and the decode loop's (patched, `for_inference`)."""
    torch.manual_seed(7)
    reference = model.generate(ids, **kwargs)
    with patchkit.patched(model.config.model_type):
        patchkit.for_inference(model)
        try:
            torch.manual_seed(7)
            ours = model.generate(ids, **kwargs)
        finally:
            patchkit.for_training(model).eval()
    return reference, ours


@pytest.mark.parametrize("layout", ["none", "left", "right"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", FAMILIES, ids=lambda a: a.name)
def test_greedy_tokens_and_logits_are_transformers_in_every_layout(arch, attn, layout, steps):
    model = tiny_model(arch, attn_implementation=attn).eval()
    ids, mask = prompts(text_vocab(model.config), layout)
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None,
                  return_dict_in_generate=True, output_logits=True)
    reference, ours = both(model, ids, **kwargs)
    assert len(steps) == NEW - 1
    assert torch.equal(ours.sequences, reference.sequences)
    for got, want in zip(ours.logits, reference.logits, strict=True):  # each step's logits, not only its argmax
        assert ((got - want).abs().max() / want.abs().max()) < 1e-5
    with patchkit.patched(arch.name):
        assert torch.equal(patchkit.generate(model, ids, NEW, attention_mask=mask, pad_token_id=0, eos_token_id=None),
                           reference.sequences)


def _stop_token(model, ids, mask, row=0, at=3):
    free = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                          eos_token_id=None)
    return int(free[row, ids.shape[1] + at])


SETTINGS = {
    "min_new_tokens": lambda eos: dict(eos_token_id=eos, min_new_tokens=10),
    "eos list": lambda eos: dict(eos_token_id=[5, eos, 9]),
    "repetition_penalty": lambda eos: dict(repetition_penalty=1.5, no_repeat_ngram_size=2),
    "bad_words_ids": lambda eos: dict(bad_words_ids=[[eos], [7, 8]]),
    "sampling top_k top_p": lambda eos: dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9),
    "sampling min_p": lambda eos: dict(do_sample=True, min_p=0.05, top_k=None),
    "sampling typical_p": lambda eos: dict(do_sample=True, typical_p=0.8, suppress_tokens=[eos]),
    "several samples": lambda eos: dict(do_sample=True, num_return_sequences=2),
    "scores and logits": lambda eos: dict(eos_token_id=eos, return_dict_in_generate=True, output_scores=True,
                                          output_logits=True),
    "generation_config": lambda eos: dict(generation_config=_config(max_new_tokens=NEW, eos_token_id=eos)),
}


def _config(**kwargs):
    from transformers import GenerationConfig

    return GenerationConfig(**kwargs)


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("arch", [A.Llama, A.Gemma2], ids=lambda a: a.name)
def test_everyday_settings_run_the_decode_loop_with_transformers_results(arch, setting, steps):
    model = tiny_model(arch).eval()
    ids, mask = prompts(text_vocab(model.config))
    kwargs = SETTINGS[setting](_stop_token(model, ids, mask))
    kwargs = {"attention_mask": mask, "pad_token_id": 0, **kwargs}
    if "generation_config" not in kwargs:
        kwargs["max_new_tokens"] = NEW
    reference, ours = both(model, ids, **kwargs)
    assert steps, "the decode loop did not run"
    if isinstance(reference, torch.Tensor):
        assert torch.equal(ours, reference)
        return
    assert torch.equal(ours.sequences, reference.sequences)
    for name in ("scores", "logits"):
        for got, want in zip(getattr(ours, name), getattr(reference, name), strict=True):
            finite = want.isfinite()
            assert torch.equal(finite, got.isfinite())
            torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-5)


def test_min_new_tokens_and_eos_lists_stop_each_row_as_transformers_does(steps):
    model = tiny_model(A.Llama).eval()
    ids, mask = prompts(text_vocab(model.config))
    eos = [_stop_token(model, ids, mask, row, at=2 + 3 * row) for row in range(3)]  # a token of each row
    reference, ours = both(model, ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(ours, reference) and ours.shape[1] < ids.shape[1] + NEW  # stopped early, every row
    eos = eos[0]
    row = ours[0, ids.shape[1]:]
    assert (row[(row == eos).nonzero()[0].item() + 1:] == 0).all()  # padded after its EOS
    reference, ours = both(model, ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                           eos_token_id=eos, pad_token_id=0)
    assert torch.equal(ours, reference) and ours.shape[1] == ids.shape[1] + NEW


def test_stop_strings_stop_where_transformers_stops(steps):
    from tokenizers import Regex, decoders, pre_tokenizers

    from patchkit.toy import _fast

    tokenizer = _fast(["<pad>", "<eos>", "<unk>", *"abcdefghijklmnopqrstuvwxyz0123456789"],
                      pre_tokenizers.Split(Regex("."), "isolated"), eos_token="<eos>")
    tokenizer.backend_tokenizer.decoder = decoders.Fuse()
    model = tiny_model(A.Llama, vocab_size=len(tokenizer)).eval()
    ids, mask = prompts(text_vocab(model.config))
    free = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                          eos_token_id=None)
    stops = [tokenizer.decode(free[row, ids.shape[1] + 4:ids.shape[1] + 6]) for row in range(3)]  # two tokens each
    reference, ours = both(model, ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=0, eos_token_id=None,
                           stop_strings=stops, tokenizer=tokenizer)
    assert steps and torch.equal(ours, reference) and ours.shape[1] <= ids.shape[1] + 6


def test_prompts_as_embeddings_run_the_loop(steps):
    model = tiny_model(A.Qwen3).eval()
    ids, mask = prompts(text_vocab(model.config))
    embeds = model.get_input_embeddings()(ids).detach()
    kwargs = dict(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                  eos_token_id=None)
    reference, ours = both(model, None, **kwargs)
    assert len(steps) == 7 and torch.equal(ours, reference) and ours.shape == (3, 8)


def test_streamers_get_the_prompt_each_step_and_the_end(steps):
    class Recorder:  # transformers' streamer protocol
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value)

        def end(self):
            self.ended = True

    model = tiny_model(A.Llama).eval()
    ids, mask = prompts(text_vocab(model.config))
    recorders = Recorder(), Recorder()
    for recorder, patched in zip(recorders, (False, True)):
        with patchkit.patched("llama") if patched else torch.no_grad():
            patchkit.for_inference(model) if patched else None
            out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, streamer=recorder, pad_token_id=0)
            patchkit.for_training(model).eval()
        assert recorder.ended and torch.equal(recorder.puts[0], ids)
        assert torch.equal(torch.stack(recorder.puts[1:], 1), out[:, ids.shape[1]:])
    assert steps and all(torch.equal(a, b) for a, b in zip(*(r.puts for r in recorders), strict=True))
    seen = []  # patchkit.generate also takes a callable: each step's tokens
    with patchkit.patched("llama"):
        out = patchkit.generate(model, ids, NEW, attention_mask=mask, pad_token_id=0, streamer=seen.append)
    assert torch.equal(torch.stack(seen, 1), out[:, ids.shape[1]:])


def test_the_returned_cache_is_transformers_and_generation_continues_from_it(steps):
    model = tiny_model(A.Gemma3Text).eval()  # sliding and full layers
    ids, mask = prompts(text_vocab(model.config), "none")
    kwargs = dict(max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True, eos_token_id=None)
    reference, ours = both(model, ids, **kwargs)
    for mine, theirs in zip(ours.cache.layers, reference.cache.layers, strict=True):
        assert type(mine) is type(theirs) and mine.get_seq_length() == theirs.get_seq_length()
        torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine.values, theirs.values, rtol=1e-5, atol=1e-5)
    longer = torch.cat([reference.sequences, ids[:, :3]], 1)
    again = {"max_new_tokens": 6, "do_sample": False, "eos_token_id": None}
    want = model.generate(longer, cache=reference.cache, **again)
    with patchkit.patched("gemma3_text"):
        got = patchkit.generate(model, longer, 6, cache=ours.cache, do_sample=False, eos_token_id=None)
    assert torch.equal(got, want)


@pytest.mark.parametrize("call", [
    dict(num_beams=2),
    dict(output_hidden_states=True, return_dict_in_generate=True),
    dict(cache_implementation="static"),
    dict(use_cache=False),
])
def test_what_the_loop_cannot_serve_runs_transformers_own_and_says_why_once(call, steps, caplog):
    model = tiny_model(A.Llama).eval()
    ids, mask = prompts(text_vocab(model.config))
    generation._logged.clear()
    with caplog.at_level(logging.WARNING, logger="patchkit"):
        reference, ours = both(model, ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0, **call)
        both(model, ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0, **call)
    assert not steps
    assert torch.equal(*(out if isinstance(out, torch.Tensor) else out.sequences for out in (ours, reference)))
    said = [r.getMessage() for r in caplog.records if "transformers' own loop" in r.getMessage()]
    assert len(said) == 1, said
    with patchkit.patched("llama"), pytest.raises(ValueError, match="cannot serve"):
        patchkit.generate(model, ids, 4, attention_mask=mask, pad_token_id=0, **call)


def test_for_inference_gives_the_class_a_twin_and_for_training_takes_it_back():
    import copy
    import pickle

    model = tiny_model(A.Llama).train()
    original = type(model)
    assert patchkit.for_inference(model) is model and not model.training
    assert type(model) is not original and isinstance(model, original) and type(model).__name__ == original.__name__
    assert type(patchkit.for_inference(tiny_model(A.Llama))) is type(model)  # one twin per class
    assert type(copy.deepcopy(model)) is original and type(pickle.loads(pickle.dumps(model))) is original
    assert type(model) is not original  # pickling left it as it was
    patchkit.for_training(model)
    assert type(model) is original and model.training
    patchkit.for_training(model)
    assert type(model) is original


def test_peft_lora_model_generates_identically(steps):
    peft = pytest.importorskip("peft")
    model = tiny_model(A.Llama)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                             init_lora_weights=False)
    model = peft.get_peft_model(model, config).eval()
    ids, mask = prompts(text_vocab(model.config))
    reference, ours = both(model, ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=0, eos_token_id=None)
    assert len(steps) == NEW - 1 and torch.equal(ours, reference)


def test_generate_works_on_an_unpatched_model_and_leaves_it_as_it_was(steps):
    model = tiny_model(A.Llama).eval()
    ids, mask = prompts(text_vocab(model.config))
    kwargs = dict(attention_mask=mask, pad_token_id=0, eos_token_id=None)
    assert torch.equal(patchkit.generate(model, ids, NEW, **kwargs), model.generate(ids, max_new_tokens=NEW, **kwargs))
    assert steps and not patchkit.is_patched("llama") and type(model).__module__.startswith("transformers")
    assert type(model) is A.Llama.model_class()


def test_a_seeded_generator_reproduces_sampling():
    model = tiny_model(A.Qwen3).eval()
    ids, mask = prompts(text_vocab(model.config))
    runs = [patchkit.generate(model, ids, NEW, attention_mask=mask, do_sample=True, top_k=50, top_p=0.9,
                              temperature=0.8, pad_token_id=0, generator=torch.Generator().manual_seed(3))
            for _ in range(2)]
    assert torch.equal(*runs)


def test_unsupported_attention_and_architectures_are_clear_errors():
    model = tiny_model(A.Llama).eval()
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        patchkit.generate(model, torch.ones(1, 4, dtype=torch.long), 2)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).eval()
    with pytest.raises(patchkit.UnknownArchitectureError, match="known architectures"):
        patchkit.generate(gpt2, torch.ones(1, 4, dtype=torch.long), 2)
    patchkit.for_inference(gpt2)  # model.generate of an unknown family: transformers' own loop
    assert gpt2.generate(torch.ones(1, 4, dtype=torch.long), max_new_tokens=2, do_sample=False).shape == (1, 6)


def test_longrope_past_its_original_length_runs_transformers_loop(steps, caplog):
    """Phi-3's LongRoPE changes factors past `original_max_position_embeddings` and transformers recomputes the
    cache there: the decode loop hands such a call back (logged), and serves one that stays below."""
    model = tiny_model(A.Phi3, original_max_position_embeddings=16).eval()
    ids, mask = prompts(text_vocab(model.config))
    generation._logged.clear()
    with caplog.at_level(logging.WARNING, logger="patchkit"):
        reference, ours = both(model, ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0)
    assert not steps and torch.equal(reference, ours)
    assert any("LongRoPE" in r.getMessage() for r in caplog.records)
    reference, ours = both(model, ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0)
    assert steps and torch.equal(reference, ours)


TRL_SAMPLING = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, min_p=0.02, repetition_penalty=1.3)


def test_sampling_draws_from_transformers_distribution():
    """The settings TRL's GRPO and RLOO pass. The decode loop's first and second tokens, drawn with one seed, and
    transformers' own, drawn with another, fit one distribution (chi-square contingency); the first token also fits
    the exact distribution of transformers' processed scores (goodness of fit). p-values are fixed by the seeds:
    a bias of a few percent in one token's probability shows up as p < 1e-3 at these sample sizes."""
    from scipy import stats

    model = tiny_model(A.Llama, vocab_size=48, initializer_range=0.4).eval()  # spread-out logits: many tokens live
    rows = 3000
    ids = torch.tensor([[5, 9, 5, 12, 7]]).repeat(rows, 1)
    settings = dict(max_new_tokens=2, pad_token_id=0, **TRL_SAMPLING)
    torch.manual_seed(1)
    reference = model.generate(ids, **settings)[:, -2:]
    with generation.lent(model):
        torch.manual_seed(2)
        ours = model.generate(ids, **settings)[:, -2:]
    vocab = model.config.vocab_size
    for step in range(2):
        table = torch.stack([torch.bincount(run[:, step], minlength=vocab) for run in (reference, ours)])
        table = table[:, table.sum(0) > 0].numpy()
        assert table.shape[1] > 5, "too few tokens live for the test to mean anything"
        assert stats.chi2_contingency(table).pvalue > 1e-3, table
    scores = model.generate(ids[:1], output_scores=True, return_dict_in_generate=True, max_new_tokens=1,
                            pad_token_id=0, **TRL_SAMPLING).scores[0][0]
    probabilities = torch.softmax(scores.double(), -1)
    observed = torch.bincount(ours[:, 0], minlength=vocab).double()
    expected = probabilities / probabilities.sum() * observed.sum()  # the same total, to scipy's tolerance
    assert observed[expected == 0].sum() == 0, "a token transformers' processors rule out was drawn"
    live = expected > 0
    assert stats.chisquare(observed[live].numpy(), expected[live].numpy()).pvalue > 1e-3


def test_same_seed_same_tokens_with_trl_sampling():
    """The loop draws in transformers' order (one multinomial over the batch per step), so one seed gives the same
    tokens; only a patched model's rounding at a cumulative-probability boundary could change a draw."""
    model = tiny_model(A.Llama).eval()
    ids, mask = prompts(text_vocab(model.config), batch=6)
    reference, ours = both(model, ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=0, **TRL_SAMPLING)
    assert torch.equal(reference, ours)
