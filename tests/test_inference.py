"""The inference path: patchkit.generate, for_inference / for_training, the decode step of every family."""

import importlib

import pytest
import torch

import patchkit
from patchkit import architectures as A
from patchkit import inference
from patchkit.parity import tiny_model

FAMILIES = [A.Llama, A.Mistral, A.Gemma, A.Gemma2, A.Gemma3Text, A.Qwen2, A.Qwen3]
NEW = 24  # longer than the tiny sliding windows (8): tokens past the window are decoded


def _prompts(vocab, batch=3, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:  # left padding of different lengths
        mask[1, :3] = 0
        mask[-1, :5] = 0
        ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def _hf_greedy(model, ids, mask, **kwargs):
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", FAMILIES, ids=lambda a: a.name)
def test_greedy_is_token_identical_to_transformers(arch, attn):
    model = tiny_model(arch, attn_implementation=attn).eval()
    for batch in (1, 3):
        ids, mask = _prompts(model.config.vocab_size, batch)
        reference = _hf_greedy(model, ids, mask)
        with patchkit.patched(arch.name):
            patched_hf = _hf_greedy(model, ids, mask)
            ours = patchkit.generate(model, ids, NEW, attention_mask=mask, pad_token_id=0)
            patchkit.for_inference(model)
            routed = _hf_greedy(model, ids, mask)
            patchkit.for_training(model)
        assert reference.shape == (batch, 12 + NEW)
        for got in (patched_hf, ours, routed):
            assert torch.equal(got, reference)


@pytest.mark.parametrize("arch", [A.Llama, A.Gemma2], ids=lambda a: a.name)
def test_decode_runs_the_triton_kernels(arch):
    """With backend="triton" the decode step's norms and MLP are patchkit's Triton kernels (the interpreter on CPU)."""
    model = tiny_model(arch).eval()
    ids, mask = _prompts(model.config.vocab_size, batch=2, length=7)
    reference = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with patchkit.patched(arch.name, backend="triton"):
        assert torch.equal(patchkit.generate(model, ids, 8, attention_mask=mask, pad_token_id=0), reference)


def test_generate_works_on_an_unpatched_model_and_leaves_it_unpatched():
    model = tiny_model(A.Llama).eval()
    ids, mask = _prompts(model.config.vocab_size)
    assert torch.equal(patchkit.generate(model, ids, NEW, attention_mask=mask, pad_token_id=0),
                       _hf_greedy(model, ids, mask))
    assert not patchkit.is_patched("llama")


def test_cache_holds_what_a_full_forward_computes():
    """The keys and values the decode steps write into the pre-allocated cache are transformers' own."""
    model = tiny_model(A.Llama).eval()
    ids, _ = _prompts(model.config.vocab_size, batch=1)
    decoding = inference.Decoding(model, ids[:, :5], None, ids.shape[1] - 5)
    storage = [k.data_ptr() for k in decoding.state.keys]
    with torch.inference_mode():
        for t in range(5, ids.shape[1]):
            decoding.step(ids[:, t])
    cache = model(ids, use_cache=True)
    cache = getattr(cache, "cache", None) or cache.past_key_values
    for i, layer in enumerate(cache.layers):
        torch.testing.assert_close(decoding.state.keys[i][:, :, :ids.shape[1]], layer.keys, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(decoding.state.values[i][:, :, :ids.shape[1]], layer.values, rtol=1e-5, atol=1e-6)
    assert [k.data_ptr() for k in decoding.state.keys] == storage  # written in place, never reallocated


def test_each_row_stops_at_its_own_eos():
    model = tiny_model(A.Llama).eval()
    ids, mask = _prompts(model.config.vocab_size)
    free = patchkit.generate(model, ids, NEW, attention_mask=mask, eos_token_id=[])
    eos = int(free[0, 12 + 3])  # row 0's fourth new token
    ours = patchkit.generate(model, ids, NEW, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
    reference = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=eos,
                               pad_token_id=0)
    assert torch.equal(ours, reference)
    stop = (free[0, 12:] == eos).nonzero()[0].item()
    assert (ours[0, 12 + stop + 1:] == 0).all()  # padded after its EOS
    assert torch.equal(ours[1:, :12 + stop + 1], free[1:, :12 + stop + 1])  # the other rows went on


def _filtered(logits, top_k=None, top_p=None):
    """Which tokens transformers' own warpers keep."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    if top_k:
        logits = TopKLogitsWarper(top_k)(None, logits)
    if top_p is not None:
        logits = TopPLogitsWarper(top_p)(None, logits)
    return logits > float("-inf")


@pytest.mark.parametrize("top_k,top_p", [(5, None), (None, 0.3), (None, 0.9), (20, 0.5)])
def test_sampling_draws_only_what_transformers_keeps(top_k, top_p):
    logits = torch.randn(4, 50) * 3
    keep = _filtered(logits / 0.7, top_k, top_p)  # transformers' order: temperature, top-k, top-p
    likely = keep & ((logits / 0.7).masked_fill(~keep, float("-inf")).softmax(-1) > 0.05)
    g = torch.Generator().manual_seed(0)
    seen = torch.zeros_like(keep)
    for _ in range(300):
        tokens = inference._sample(logits, True, 0.7, top_k, top_p, g)
        seen[torch.arange(4), tokens] = True
    assert not (seen & ~keep).any()
    assert not (likely & ~seen).any()  # and every token with a real chance does come up


def test_temperature_sharpens_and_a_seed_reproduces():
    logits = torch.randn(1, 40)
    g = torch.Generator()

    def draws(temperature):
        g.manual_seed(1)
        return torch.stack([inference._sample(logits, True, temperature, None, None, g) for _ in range(400)])

    assert torch.equal(draws(1.0), draws(1.0))
    top = logits.argmax()
    assert (draws(0.2) == top).float().mean() > (draws(1.5) == top).float().mean()


def test_sampled_generation_is_seeded_and_top_k_1_is_greedy():
    model = tiny_model(A.Qwen3).eval()
    ids, mask = _prompts(model.config.vocab_size)
    runs = [patchkit.generate(model, ids, NEW, attention_mask=mask, do_sample=True, top_k=50, top_p=0.9,
                              temperature=0.8, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(*runs)
    greedy = patchkit.generate(model, ids, NEW, attention_mask=mask, pad_token_id=0)
    one = patchkit.generate(model, ids, NEW, attention_mask=mask, pad_token_id=0, do_sample=True, top_k=1)
    assert torch.equal(one, greedy)


def test_streamers_see_every_token():
    model = tiny_model(A.Llama).eval()
    ids, _ = _prompts(model.config.vocab_size, batch=1)
    steps = []
    out = patchkit.generate(model, ids, NEW, streamer=steps.append, eos_token_id=[])
    assert torch.equal(torch.stack(steps, 1), out[:, 12:])

    class Recorder:  # transformers' streamer protocol: the prompt, then each step, then end()
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value)

        def end(self):
            self.ended = True

    recorder = Recorder()
    patchkit.for_inference(model)
    out = model.generate(ids, max_new_tokens=NEW, do_sample=False, streamer=recorder, eos_token_id=None)
    assert recorder.ended and torch.equal(recorder.puts[0], ids)
    assert torch.equal(torch.cat([p.view(1, -1) for p in recorder.puts[1:]], 1), out[:, 12:])


def test_for_inference_routes_what_it_serves_and_leaves_the_rest_to_transformers(monkeypatch):
    model = tiny_model(A.Llama).train()
    calls = []
    real = inference.generate
    monkeypatch.setattr(inference, "generate", lambda *a, **k: calls.append(k) or real(*a, **k))
    handle = patchkit.patch("llama")
    assert handle.for_inference(model) is model and not model.training
    ids, mask = _prompts(model.config.vocab_size)
    model.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0)
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=True, top_p=0.8, pad_token_id=0)
    assert len(calls) == 2 and calls[1]["top_k"] == 50  # transformers' default top-k comes along
    beams = model.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=2, pad_token_id=0)
    scores = model.generate(ids, attention_mask=mask, max_new_tokens=4, output_scores=True,
                            return_dict_in_generate=True, pad_token_id=0)
    model.generate(ids, max_new_tokens=4, pad_token_id=0)  # pads in the prompt without a mask: transformers infers
    assert len(calls) == 2 and beams.shape == (3, 16) and len(scores.scores) == 4
    handle.for_training(model)
    assert model.training and "generate" not in vars(model)
    model.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0)
    assert len(calls) == 2


def test_peft_lora_model_generates_identically():
    peft = pytest.importorskip("peft")
    model = tiny_model(A.Llama)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                             init_lora_weights=False)
    model = peft.get_peft_model(model, config).eval()
    ids, mask = _prompts(model.config.vocab_size)
    reference = _hf_greedy(model, ids, mask)
    with patchkit.patched("llama"):
        assert torch.equal(patchkit.generate(model, ids, NEW, attention_mask=mask, pad_token_id=0), reference)


def test_unsupported_attention_is_a_clear_error():
    model = tiny_model(A.Llama).eval()
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        patchkit.generate(model, torch.ones(1, 4, dtype=torch.long), 2)


def test_unknown_architecture_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).eval()
    with pytest.raises(patchkit.UnknownArchitectureError, match="known architectures"):
        patchkit.generate(model, torch.ones(1, 4, dtype=torch.long), 2)


def test_project_matches_linear_for_few_rows():
    linear = torch.nn.Linear(1024, 1040)
    x = torch.randn(5, 1, 1024)
    with torch.inference_mode():
        torch.testing.assert_close(inference.project(linear, x), linear(x))
        torch.testing.assert_close(inference.project(linear, x[:1]), linear(x[:1]))


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="MKL-packed weights need a torch built with MKL")
def test_packed_weights_serve_their_row_count_only():
    linear = torch.nn.Linear(64, 96)
    packs = inference.Packs(4)
    token = inference._packs.set(packs)
    try:
        with torch.inference_mode():
            for rows in (4, 3, 1):
                x = torch.randn(rows, 64)
                torch.testing.assert_close(inference.project(linear, x), linear(x))
    finally:
        inference._packs.reset(token)
    assert list(packs) == [linear] and packs[linear] is not None  # packed once, on first use with 4 rows
    assert not inference.Packs(1).budget and not inference.Packs(65).budget  # only 2 to 64 rows


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="MKL-packed weights need a torch built with MKL")
def test_batched_decoding_packs_each_plain_linear_within_its_budget():
    model = tiny_model(A.Llama).eval()
    ids, mask = _prompts(model.config.vocab_size)
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    decoding, starved = inference.Decoding(model, ids, mask, 4), inference.Decoding(model, ids, mask, 4)
    starved.packs.budget = 0  # no free memory: the plain weights serve
    tokens = decoding.logits.argmax(-1)
    with torch.inference_mode():
        torch.testing.assert_close(decoding.step(tokens), starved.step(tokens))
    assert set(decoding.packs) == set(linears) and all(p is not None for p in decoding.packs.values())
    assert all(p is None for p in starved.packs.values())


def test_decode_uses_the_backend_the_family_was_patched_with(monkeypatch):
    norm_module = importlib.import_module("patchkit.kernels.rms_norm")  # the package exports the op by that name
    model = tiny_model(A.Llama).eval()
    seen = []
    real = norm_module.dispatch
    monkeypatch.setattr(norm_module, "dispatch", lambda op, backend, device: seen.append(backend) or real(
        op, backend, device))
    with patchkit.patched("llama", backend="torch"):
        patchkit.generate(model, torch.ones(1, 4, dtype=torch.long), 3)
    assert seen and set(seen) == {"torch"}
