"""Text <-> token ids for Hugging Face checkpoints, and the chat formats of the models we support.

Reads `tokenizer.json` through the `tokenizers` library (the same Rust code `transformers` uses),
special tokens from `tokenizer_config.json` and stop ids from `generation_config.json`.

Simplification: chat formatting is hand-written for two families instead of running each model's
Jinja template: "chatml" (Qwen2.5, SmolLM2, our demo model) and "llama3" (Llama 3.x headers). The
tests check both against the templates' own output for system/user conversations. Templates that
insert extra text (a default system message when none is given, Llama 3.1's knowledge-date lines)
are not reproduced: always pass a system message, as this project does.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from model import CheckpointError
from plumbing.runs import written_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "chat_template.jinja", "special_tokens_map.json")


class Tokenizer:
    """tokenizer.json through `tokenizers`, special tokens and stop ids from the config files.

    Chat formatting is hand-written for the two families we support ("chatml": Qwen2.5, SmolLM2,
    our demo model; "llama3": Llama 3.x headers) and equals what their templates print for
    system/user/assistant turns; `chat_format` is guessed from the template text.
    """

    def __init__(self, path):
        path = Path(path)
        if not (path / "tokenizer.json").exists():
            raise CheckpointError(f"{path / 'tokenizer.json'}: file not found")
        try:
            self.tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a plain Exception for a cut or malformed file
            raise CheckpointError(f"{path / 'tokenizer.json'}: unreadable ({e})") from None
        cfg = _read_json(path / "tokenizer_config.json")
        gen = _read_json(path / "generation_config.json")
        template = cfg.get("chat_template") or ""
        if (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        self.chat_format = "llama3" if "<|start_header_id|>" in template else "chatml"
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        stops = gen.get("eos_token_id", [])
        stops = set(stops if isinstance(stops, list) else [stops])
        turn_end = "<|im_end|>" if self.chat_format == "chatml" else "<|eot_id|>"
        for t in (self.eos_token, turn_end):
            if t and self.tok.token_to_id(t) is not None:
                stops.add(self.tok.token_to_id(t))
        if not stops:
            raise CheckpointError(f"{path}: no eos token in tokenizer_config.json or generation_config.json")
        self.stop_ids = tuple(sorted(stops))
        # The token that closes an assistant turn in the chat format: what SFT teaches the model to end
        # a trace with. Not min(stop_ids): Qwen2.5 stops on [<|im_end|>, <|endoftext|>] and Llama 3 on
        # [<|end_of_text|>, <|eot_id|>], but their chat templates close a turn with <|im_end|> / <|eot_id|>.
        turn_end_id = self.tok.token_to_id(turn_end)
        eos_id = self.tok.token_to_id(self.eos_token) if self.eos_token else None
        self.turn_end_id = next(i for i in (turn_end_id, eos_id, self.stop_ids[0]) if i is not None)
        pad = _token_text(cfg.get("pad_token"))
        self.pad_id = self.tok.token_to_id(pad) if pad and self.tok.token_to_id(pad) is not None \
            else self.stop_ids[0]

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def check_fits(self, embedding_rows: int, path) -> None:
        """Refuse a tokenizer whose ids reach past the model's embedding (an IndexError at the first
        forward pass otherwise). Fewer tokens than rows is normal: vocabularies are padded."""
        if self.vocab_size > embedding_rows:
            raise CheckpointError(f"{path}: the tokenizer has {self.vocab_size} tokens but the model's embedding "
                                  f"only {embedding_rows} rows (config.json vocab_size): a tokenizer from another "
                                  "model?")

    def encode(self, text: str) -> list[int]:
        # special tokens are written into the text by the chat format, so none are added here
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Format [{"role", "content"}, ...] as the model's chat template would."""
        if self.chat_format == "llama3":
            out = self.bos_token or "<|begin_of_text|>"
            for m in messages:
                out += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
            return out + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")
        out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def _read_json(f: Path) -> dict:
    if not f.exists():
        return {}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: invalid JSON ({e})") from None


def _token_text(t) -> str | None:
    return t.get("content") if isinstance(t, dict) else t


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
