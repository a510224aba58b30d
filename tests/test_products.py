"""The inference path's matrix products: the fastest kernel per weight shape and row count, measured once."""

import functools
import logging

import pytest
import torch
import torch.nn.functional as F

from patchkit import architectures as A
from patchkit import generation, inference, products
from patchkit.parity import tiny_model, text_vocab

COPYING = [name for name in products.available() if products.KERNELS[name][1] is not None]  # mkl, onednn here


@pytest.fixture
def ranked(monkeypatch):
    """`ranked(order)` fixes the order every shape gets, as if measured so (kernels this torch lacks dropped)."""
    monkeypatch.setattr(products, "_ranked", {})

    def force(order):
        order = tuple(name for name in order if name in products.available())
        monkeypatch.setattr(products, "ranking", lambda weight, bias, rows: order)
        return order

    return force


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("name", products.available())
def test_every_kernel_computes_the_linear(name, bias):
    linear = torch.nn.Linear(64, 96, bias=bias)
    kernel = products.KERNELS[name][0]
    with torch.no_grad():
        for rows in (1, 3, 8):
            x = torch.randn(rows, 64)
            got = kernel(products.copy_for(name, linear.weight, rows), x, linear.weight, linear.bias)
            torch.testing.assert_close(got, linear(x))


def test_ranking_is_measured_once_per_shape_and_row_count(monkeypatch):
    monkeypatch.setattr(products, "_ranked", {})
    weight = torch.randn(48, 32)
    copies = []
    real = products.copy_for
    monkeypatch.setattr(products, "copy_for", lambda name, w, rows: copies.append(name) or real(name, w, rows))
    first = products.ranking(weight, None, 4)
    assert sorted(first) == sorted(products.available()) and {"linear", "wxt"} <= set(first)
    made = len(copies)
    assert products.ranking(torch.randn(48, 32), None, 4) is first  # another weight of that shape: no new timing
    assert len(copies) == made
    products.ranking(weight, None, 2)
    assert len(products._ranked) == 2 and len(copies) == 2 * made


@pytest.mark.parametrize("name", COPYING)
def test_a_decode_call_copies_only_where_a_copy_is_fastest_and_only_within_its_budget(ranked, name):
    ranked((name, "wxt", "linear"))
    big, second = torch.nn.Linear(128, 160), torch.nn.Linear(128, 136)  # both large enough to be measured
    table = products.Products(4)
    table.budget = big.weight.nbytes  # room for one copy
    with torch.no_grad():
        assert isinstance(table[big], functools.partial) and table.budget == 0
        assert table[second] is not None and table[second].args == (None,)  # no room left: the next fastest
    ranked(("linear", name, "wxt"))
    assert products.Products(4)[big] is None  # F.linear
    ranked((name, "wxt", "linear"))
    assert products.Products(4)[torch.nn.Linear(64, 96)] is None  # too small to be worth timing: F.linear


@pytest.mark.parametrize("first", products.available())
def test_project_in_a_decode_step_gives_the_linear_with_every_choice(ranked, first):
    ranked((first, *(name for name in products.available() if name != first)))
    linear = torch.nn.Linear(128, 160)
    table = products.Products(4)
    token = products._products.set(table)
    try:
        with torch.no_grad():
            for rows in (4, 3, 1):  # only the call's row count uses its choice
                x = torch.randn(rows, 128)
                torch.testing.assert_close(products.project(linear, x), linear(x))
    finally:
        products._products.reset(token)
    assert (table[linear] is None) == (first == "linear")


def test_project_outside_a_decode_step_calls_the_layer_and_times_nothing(monkeypatch):
    linear = torch.nn.Linear(1024, 1040)
    monkeypatch.setattr(products, "_ranked", {})
    monkeypatch.setattr(products, "ranking", lambda *a: pytest.fail("timed outside a decode call"))
    calls = []
    linear.register_forward_hook(lambda *a: calls.append(1))  # an engine's hooks (FSDP, TP) run
    x = torch.randn(5, 1, 1024)
    with torch.no_grad():
        torch.testing.assert_close(products.project(linear, x), F.linear(x, linear.weight, linear.bias))
    assert calls == [1]


def test_ranking_draws_nothing_from_the_global_generator(monkeypatch, caplog):
    monkeypatch.setattr(products, "_ranked", {})
    weights = torch.randn(64, 256), torch.randn(64, 128)
    state = torch.get_rng_state()
    with caplog.at_level(logging.INFO, logger="patchkit"):
        for weight in weights:
            products.ranking(weight, None, 2)
    assert torch.equal(torch.get_rng_state(), state)
    assert len([r for r in caplog.records if "times" in r.getMessage()]) == 1  # logged once per process


def test_timing_off_by_environment(ranked, monkeypatch):
    ranked((*COPYING, "wxt", "linear"))
    monkeypatch.setenv("PATCHKIT_TIMED_PRODUCTS", "0")
    big = torch.nn.Linear(256, 256)
    with torch.no_grad():
        assert products.Products(4)[big] is None  # F.linear


def test_batched_decoding_gives_the_same_logits_with_and_without_copies(ranked):
    ranked((*COPYING, "wxt", "linear"))
    model = tiny_model(A.Llama, hidden_size=128, intermediate_size=256, head_dim=32).eval()  # weights worth timing
    ids = torch.randint(3, text_vocab(model.config), (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    decoding, starved = inference.Decoding.prefill(model, ids, mask, 4), inference.Decoding.prefill(model, ids, mask, 4)
    starved.products.budget = 0  # no free memory: no copies
    tokens = decoding.logits.argmax(-1)
    with torch.inference_mode():
        torch.testing.assert_close(decoding.step(tokens), starved.step(tokens))
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert set(decoding.products) == set(linears)  # every plain linear of the model has its choice
    assert all((c is not None) == (m.weight.numel() >= products.MEASURED) for m, c in decoding.products.items())
    assert all(c is None or c.args == (None,) for c in starved.products.values())


def test_a_generation_lent_without_packed_copies_makes_none(ranked, monkeypatch):
    ranked((*COPYING, "wxt", "linear"))
    model = tiny_model(A.Llama, hidden_size=128, intermediate_size=256, head_dim=32).eval()
    ids = torch.randint(3, text_vocab(model.config), (2, 6), generator=torch.Generator().manual_seed(0))
    tables = []
    real = inference.Decoding.__init__
    monkeypatch.setattr(inference.Decoding, "__init__", lambda self, *a, **k: real(self, *a, **k) or tables.append(
        self.products))
    outputs = []
    for packed in (True, False):
        with generation.lent(model, packed=packed):
            outputs.append(model.generate(ids, max_new_tokens=3, do_sample=False))
    assert generation.options().packed  # the setting ends with the block
    torch.testing.assert_close(*outputs)
    copied, lean = tables
    assert any(c is not None and c.args != (None,) for c in copied.values()) == bool(COPYING)
    assert lean and lean.budget == 0 and all(c is None or c.args == (None,) for c in lean.values())
