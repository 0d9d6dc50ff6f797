"""The demo's tokenizer: a byte-level BPE trained on the demo's own text, saved in the Hugging Face
layout so the demo model loads like any checkpoint (the tokenizer itself is model.Tokenizer)."""

from __future__ import annotations

import json

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from model import Tokenizer
from plumbing.runs import written_dir

# -----------------------------------------------------------------------------
# A tokenizer for the demo model, trained on the demo's own text

CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                   "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def train_bpe(texts, out_dir, vocab_size: int = 2048) -> Tokenizer:
    """Train a byte-level BPE on `texts`, save it with ChatML special tokens in the Hugging Face layout.

    The pre-split keeps one word one token wherever it stands: a decimal number such as " 4.0" stays
    whole (GPT-2 splits it into " 4", ".", "0"), punctuation is split off words (so " Drama" in the
    prompt and in "Drama;" of a trace is the same token, and copying it is a copy, not a translation),
    and a tag such as "<analyze user>" or "[pos]" stays one piece.
    """
    tok = HFTokenizer(models.BPE())
    words = r" ?</?[a-z]+(?: [a-z]+)?>| ?\[[a-z]+\]| ?[0-9]+(?:\.[0-9]+)?| ?[A-Za-z_'\-]+| ?[^\sA-Za-z0-9_'\-]+|\s+"
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(words), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    with written_dir(out_dir) as tmp:  # whole or not at all: a run's later checkpoints depend on it
        try:
            tok.save(str(tmp / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a plain Exception for a failed write (a full disk)
            raise OSError(str(e)) from None
        (tmp / "tokenizer_config.json").write_text(json.dumps({
            "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
            "unk_token": None, "chat_template": CHATML_TEMPLATE, "model_max_length": 4096,
            "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": tok.token_to_id("<|im_end|>"),
                                                                "pad_token_id": tok.token_to_id("<|endoftext|>")}))
    return Tokenizer(out_dir)
