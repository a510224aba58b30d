"""Tiny local tokenizers and synthetic data for tests, examples and benchmarks: nothing is downloaded.

- `word_tokenizer(vocab_size)`: words `w0 w1 ...`, one id each; for pre-tokenized random documents.
- `chat_tokenizer()`: one token per character plus chat specials, with a chat template that marks
  assistant turns with `{% generation %}` (what TRL's `assistant_only_loss` needs).
- `arithmetic(n)`: conversations "12+7=" -> "19", a task a tiny model learns in a few hundred steps;
  `arithmetic(n, prompt_completion=True)` gives the same as prompt/completion pairs.
- `questions(n)`: the same questions as `prompt`s with their `answer`, for GRPO and RLOO rewards;
  `preferences(n)`: DPO's `prompt`/`chosen`/`rejected` (right and wrong answers), `unpaired=True` KTO's rows.
- `documents(n, vocab_size, max_len)`: pre-tokenized random documents of 32..max_len tokens.
- `model(family, tokenizer)`: a tiny random `*ForCausalLM` of a registered family, sized for the tokenizer:
  what the docs' snippets train where a real run loads one with `from_pretrained`.
"""

from __future__ import annotations

import random

SPECIALS = ["<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
CHARS = list("0123456789+-*= ")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>{% generation %}{{ message['content'] }}<|end|>"
    "{% endgeneration %}"
    "{% else %}<|user|>{{ message['content'] }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _fast(vocab: list[str], pre_tokenizer, **specials):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizer
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", **specials)


def word_tokenizer(vocab_size: int):
    from tokenizers import pre_tokenizers

    words = SPECIALS[:3] + [f"w{i}" for i in range(vocab_size - 3)]
    return _fast(words, pre_tokenizers.WhitespaceSplit(), eos_token="<eos>")


def chat_tokenizer():
    from tokenizers import Regex, decoders, pre_tokenizers

    tok = _fast(SPECIALS + CHARS, pre_tokenizers.Split(Regex("."), "isolated"), eos_token="<|end|>",
                additional_special_tokens=SPECIALS[3:])
    tok.backend_tokenizer.decoder = decoders.Fuse()  # characters back to text without spaces between them
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _sums(n: int, seed: int, max_operand: int):
    rng = random.Random(seed)
    for _ in range(n):
        a, b, op = rng.randint(0, max_operand), rng.randint(0, max_operand), rng.choice("+-")
        yield rng, f"{a}{op}{b}=", a + b if op == "+" else a - b


def _user(text):
    return [{"role": "user", "content": text}]


def _assistant(text):
    return [{"role": "assistant", "content": text}]


def arithmetic(n: int, *, seed: int = 0, max_operand: int = 20, prompt_completion: bool = False):
    """`n` sums and differences of small numbers, as chat `messages` (or `prompt`/`completion`)."""
    from datasets import Dataset

    rows = []
    for _, question, answer in _sums(n, seed, max_operand):
        if prompt_completion:
            rows.append({"prompt": _user(question), "completion": _assistant(str(answer))})
        else:
            rows.append({"messages": _user(question) + _assistant(str(answer))})
    return Dataset.from_list(rows)


def questions(n: int, *, seed: int = 0, max_operand: int = 20):
    """`n` arithmetic questions as chat `prompt`s with their `answer` (a string), for GRPO's and RLOO's rewards."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": _user(q), "answer": str(a)} for _, q, a in _sums(n, seed, max_operand)])


def preferences(n: int, *, seed: int = 0, max_operand: int = 20, unpaired: bool = False):
    """`n` arithmetic questions with the right answer and a wrong one: DPO's `prompt`/`chosen`/`rejected` pairs, or
    (`unpaired=True`) KTO's `prompt`/`completion`/`label` rows, alternately right (True) and wrong (False)."""
    from datasets import Dataset

    rows = []
    for i, (rng, question, answer) in enumerate(_sums(n, seed, max_operand)):
        wrong = str(answer + rng.choice([-2, -1, 1, 2]))
        if unpaired:
            right = i % 2 == 0
            rows.append({"prompt": _user(question), "completion": _assistant(str(answer) if right else wrong),
                         "label": right})
        else:
            rows.append({"prompt": _user(question), "chosen": _assistant(str(answer)),
                         "rejected": _assistant(wrong)})
    return Dataset.from_list(rows)


def documents(n: int, vocab_size: int, max_len: int, *, seed: int = 0, min_len: int = 32):
    """`n` pre-tokenized documents (`input_ids`) of random length in [min_len, max_len]."""
    from datasets import Dataset

    rng = random.Random(seed)
    lengths = [rng.randint(min_len, max_len) for _ in range(n)]
    return Dataset.from_list([{"input_ids": [rng.randrange(3, vocab_size) for _ in range(k)]} for k in lengths])


def model(family: str = "llama", tokenizer=None, **config):
    """A tiny random model of `family` (a few hundred thousand parameters, random weights), its vocabulary and
    special tokens `tokenizer`'s; `config` overrides any setting."""
    import patchkit
    from patchkit.parity import tiny_model

    if tokenizer is not None:
        config = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                  "eos_token_id": tokenizer.eos_token_id, "bos_token_id": None, **config}
    return tiny_model(patchkit._resolve(family)[0], **config)
