"""Every registry model's prompt is its chat template's, token for token, in classification and in training,
on any day: on the bundled model and on the stand-ins' real tokenizers and templates (tests/standins.py)."""

from __future__ import annotations

from datetime import datetime

import pytest
from standins import TEXTS, llama2_tokenizer_json, source

from mlx_intent.classifier import IntentClassifier
from mlx_intent.models import registry
from mlx_intent.prompts import PROMPT_STYLES, clean_user_text
from mlx_intent.tuner.train import build_examples

ROW = {"text": "", "primary_intent": "greeting", "all_intents": ["greeting"]}


@pytest.fixture(scope="module")
def loaded(standin_repos, bundled) -> dict:
    """Every registry model as mlx-lm loads it, (model, tokenizer): the stand-ins and the bundled model."""
    from mlx_lm import load

    return {name: load(str(path)) for name, path in standin_repos.items()} | {"smollm2-135m": bundled}


@pytest.fixture(scope="module")
def tokenizers(loaded) -> dict:
    return {name: tokenizer for name, (_, tokenizer) in loaded.items()}


# ---- the stand-ins are the real tokenizers ---------------------------------------------------------------------


def test_the_llama2_tokenizer_rebuilt_from_the_gguf_tokenizes_as_llama_cpp_does():
    """llama.cpp's own test of its Llama 2 vocabulary (inputs and the ids it expects), on the rebuilt tokenizer."""
    tok = llama2_tokenizer_json(source("ggml-vocab-llama-spm.gguf"))
    texts = source("ggml-vocab-llama-spm.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    expected = source("ggml-vocab-llama-spm.gguf.out").read_text().split("\n")
    assert len(texts) >= 40
    for text, ids in zip(texts, expected):
        assert tok.encode(text, add_special_tokens=False).ids == [int(i) for i in ids.split()], repr(text)


def test_the_llama3_stand_in_has_the_text_models_special_tokens(tokenizers):
    tok = tokenizers["llama-3.2-3b"]
    assert len(tok._tokenizer) == 128256  # the vocabulary of the 3B: no <|image|> (128256)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|begin_of_text|>", "<|eot_id|>", "<|reserved_special_token_2|>")}
    assert ids == {"<|begin_of_text|>": 128000, "<|eot_id|>": 128009, "<|reserved_special_token_2|>": 128005}
    assert tok.convert_ids_to_tokens(128255) == "<|reserved_special_token_247|>"
    assert set(tok.eos_token_ids) >= {128009}


def test_a_missing_source_file_fails_with_the_command_to_run(monkeypatch, tmp_path):
    import standins

    monkeypatch.setattr(standins, "SOURCES", tmp_path)
    with pytest.raises(pytest.fail.Exception, match="run scripts/setup.sh"):
        source("ggml-vocab-llama-spm.gguf")


# ---- every registry model's prompt is its chat template's ------------------------------------------------------


def chat_template_ids(tok, system: str, text: str) -> list[int]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": text}]
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, date_string="26 Jul 2024"))


@pytest.mark.parametrize("name", list(registry.REGISTRY))
def test_the_prompt_is_the_chat_templates_token_for_token(name, loaded):
    """In classification (system prompt in full) and in training (compact prompt): TinyLlama's SentencePiece
    tokenizer gave the user text on its own a word boundary ("▁Hello") the rendered template does not have."""
    model, tok = loaded[name]
    assert tok.chat_template  # each model's own template, never the fallback
    clf = IntentClassifier(name, model=model, tokenizer=tok, use_adapter=False)  # the session's models folder
    rows = [{**ROW, "text": t} for t in TEXTS]
    examples = build_examples(rows, tok, registry.get_spec(name).chat_format, "compact")
    assert len(examples) == len(TEXTS)
    for text, (tokens, _) in zip(TEXTS, examples):
        cleaned = clean_user_text(text, clf._specials)
        expected = chat_template_ids(tok, PROMPT_STYLES["full"](), cleaned)
        assert clf.prefix_ids + clf.query_ids(text)[0] + clf.suffix_ids == expected, text
        expected = chat_template_ids(tok, PROMPT_STYLES["compact"](), cleaned)
        assert tokens[: len(expected)] == expected, text
        assert tok.decode(tokens[len(expected) :]).startswith('{"primary_intent": "')


class _Clock(datetime):
    today_is = datetime(2024, 1, 1)

    @classmethod
    def now(cls, tz=None):
        return cls.today_is


@pytest.mark.parametrize("name", ["llama-3.2-3b", "llama-3.1-8b"])
def test_the_llama3_prompt_is_the_same_every_day(name, tokenizers, monkeypatch):
    """Llama 3.2's template writes "Today Date" from the clock (transformers' strftime_now): the system prompt, its
    KV-cache key and the prompt an adapter or a calibration was fitted on changed daily.  It is pinned to the
    templates' own fallback date."""
    from transformers.utils import chat_template_utils

    from mlx_intent.prompts import chat_prompt

    monkeypatch.setattr(chat_template_utils, "datetime", _Clock)
    tok = tokenizers[name]
    seen = []
    for day in (datetime(2025, 3, 1), datetime(2026, 12, 31)):
        monkeypatch.setattr(_Clock, "today_is", day)
        prompt = chat_prompt(tok, registry.get_spec(name).chat_format)
        seen.append((prompt.prefix, prompt.suffix))
        assert "Today Date: 26 Jul 2024" in tok.decode(prompt.prefix)
    assert seen[0] == seen[1]
