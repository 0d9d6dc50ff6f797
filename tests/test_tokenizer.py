"""Tests for model.Tokenizer and plumbing/tokenizer.py's BPE trainer: the real SmolLM2 tokenizer (when ../shared is present) round-trips text and
formats chats exactly as its template does; a Llama 3 tokenizer gets the header format; errors name files."""

from __future__ import annotations

import json

import pytest

from model import CheckpointError, Tokenizer
from plumbing.tokenizer import train_bpe

TEXTS = ["Hello, world!", "  two spaces, a\ttab and a\nnewline ", "naïve café, Zürich, 東京, Ελληνικά",
         "emoji 🎬🍿👍🏽 ok", "<analyze user>likes jazz</analyze user>\n<analyze item>[pos] smooth</analyze item>\n"
         "<match>good fit</match>\n<rate>4</rate>"]


def render(template: str, messages, **kw) -> str:
    jinja2 = pytest.importorskip("jinja2")
    return jinja2.Environment().from_string(template).render(messages=messages, add_generation_prompt=True, **kw)


def test_smollm2_tokenizer_round_trips_text(smollm2_dir):
    """decode(encode(text)) == text for ASCII, unicode, emoji and the four RecZero tags."""
    tok = Tokenizer(smollm2_dir)
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text


def test_smollm2_stop_ids_and_chat_template(smollm2_dir):
    """<|im_end|> (id 2) is a stop id, and apply_chat equals chat_template.jinja for system + user."""
    tok = Tokenizer(smollm2_dir)
    assert tok.chat_format == "chatml" and tok.tok.token_to_id("<|im_end|>") == 2 and 2 in tok.stop_ids
    messages = [{"role": "system", "content": "You predict ratings."}, {"role": "user", "content": TEXTS[4]}]
    template = (smollm2_dir / "chat_template.jinja").read_text()
    text = tok.apply_chat(messages)
    assert text == render(template, messages, bos_token=tok.bos_token, eos_token=tok.eos_token)
    # the special tokens the format writes must encode as single ids, not as their characters
    assert tok.encode(text).count(tok.tok.token_to_id("<|im_start|>")) == 3


LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def test_llama3_chat_format_matches_its_template(tmp_path):
    """A Llama 3 tokenizer dir gets the header format the template prints, and <|eot_id|> stops."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    words = ["[UNK]", "You", "rate", "films", ".", "I", "like", "jazz", "system", "user", "assistant"]
    hf = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                           "<|end_header_id|>", "<|eot_id|>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": LLAMA3_TEMPLATE, "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}))

    tok = Tokenizer(tmp_path)
    assert tok.chat_format == "llama3"
    messages = [{"role": "system", "content": " You rate films.\n"}, {"role": "user", "content": "I like jazz "}]
    text = tok.apply_chat(messages)
    assert text == render(LLAMA3_TEMPLATE, messages, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    assert {hf.token_to_id("<|eot_id|>"), hf.token_to_id("<|end_of_text|>")} <= set(tok.stop_ids)
    assert tok.encode(text).count(hf.token_to_id("<|start_header_id|>")) == 3
    # the template closes a turn with <|eot_id|>, though <|end_of_text|> has the smaller id
    assert tok.stop_ids[0] == hf.token_to_id("<|end_of_text|>") and tok.turn_end_id == hf.token_to_id("<|eot_id|>")


def test_qwen_style_turn_end_is_im_end_not_the_smallest_stop_id(tmp_path):
    """Qwen2.5 stops on [<|im_end|>, <|endoftext|>] with <|endoftext|> first in id order: SFT must end a
    trace with <|im_end|>, the token its chat template closes every turn with."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    from data import Example, Item, Rating
    from plumbing.teachers import Trace
    from reczero import Prompter
    from train import sft_row

    words = ["[UNK]", "The", "user", "likes", "Drama", ".", "system", "assistant"]
    hf = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    end_of_text, im_end = hf.token_to_id("<|endoftext|>"), hf.token_to_id("<|im_end|>")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": "{{ '<|im_start|>' }}", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [im_end, end_of_text]}))

    tok = Tokenizer(tmp_path)
    assert tok.stop_ids == (end_of_text, im_end) and tok.turn_end_id == im_end
    example = Example(Rating("u", "i", 4.0, 10), Item("i"), [], [], 3.0, 3.0)
    _, completion = sft_row(Prompter(tok), Trace(example, "The user likes Drama .", rationalised=False))
    assert completion[-1] == im_end and completion[:-1] == tok.encode("The user likes Drama .")


def test_missing_tokenizer_json_is_a_checkpoint_error(tmp_path):
    """A directory without tokenizer.json is a CheckpointError naming the file."""
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer(tmp_path)


def test_demo_bpe_keeps_words_tags_and_numbers_whole(tmp_path):
    """The demo's BPE: a tag is one token, a number one token, and a word is the same token whether
    punctuation follows it or not (so copying it from the prompt is a copy)."""
    corpus = ["Categories: Drama\nThe user likes Drama; the item is liked. <analyze user> [pos] 3.54 4.0"] * 50
    tok = train_bpe(corpus, tmp_path / "bpe", vocab_size=1000)  # enough merges for every word
    pieces = [tok.decode([i]) for i in tok.encode("The user likes Drama; <analyze user> [pos] Drama, 3.54")]
    assert pieces == ["The", " user", " likes", " Drama", ";", " <analyze user>", " [pos]", " Drama", ",", " 3.54"]
