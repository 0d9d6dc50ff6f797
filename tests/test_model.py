"""Tests for model.py's decoder and plumbing/checkpoints.py: logits, gradients and greedy generation
equal to `transformers`, saving and loading (shards, bf16, bad checkpoints), config parsing, gradient
checkpointing, and the speed benchmark's quick mode. All on CPU with tiny models (hidden 64, 2 layers,
vocab 300, tiny_models.py); the `transformers` comparisons skip when it is not installed. The sampler
(test_sampling.py) and the tokenizer (test_tokenizer.py) have their own test files."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_models import GREEDY, PROMPTS, VOCAB, randomise, tiny_model

import model as model_module
from model import CheckpointError, ModelConfig, Transformer, generate, right_pad
from plumbing.checkpoints import TrainerState, load_config, load_model, load_optimizer, save_checkpoint, save_model

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


# -----------------------------------------------------------------------------
# Equivalence with transformers on tiny random checkpoints


def make_hf_model(kind: str):
    """A tiny random Qwen2 (q/k/v bias, tied), Llama (llama3 RoPE, untied) or Qwen3 (head_dim 24)."""
    tr = pytest.importorskip("transformers")
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if kind == "qwen2":
        cfg = tr.Qwen2Config(**common, tie_word_embeddings=True)
        cls = tr.Qwen2ForCausalLM
    elif kind == "llama":
        # original_max_position_embeddings 32: prompt + 32 new tokens run past it, and the
        # wavelengths of head_dim 16 fall in all three llama3 bands (kept, interpolated, slowed)
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
        cfg = tr.LlamaConfig(**common, rope_parameters=rope, tie_word_embeddings=False)
        cls = tr.LlamaForCausalLM
    else:
        cfg = tr.Qwen3Config(**common, head_dim=24, tie_word_embeddings=True)
        cls = tr.Qwen3ForCausalLM
    torch.manual_seed(0)
    return randomise(cls(cfg), seed=1).eval()


@pytest.fixture(scope="module", params=["qwen2", "llama", "qwen3"])
def hf_checkpoint(request, tmp_path_factory):
    """(transformers model, directory it was saved to with save_pretrained), once per architecture."""
    hf = make_hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, path


def test_config_parsed_from_transformers_checkpoint(hf_checkpoint):
    """load_config reads the architecture, head_dim, tying and RoPE scaling that transformers wrote."""
    hf, path = hf_checkpoint
    cfg = load_config(path)
    assert cfg.head_dim == (24 if cfg.arch == "qwen3" else 16)
    assert cfg.tie_word_embeddings == hf.config.tie_word_embeddings
    assert cfg.qkv_bias == (cfg.arch == "qwen2")
    if cfg.arch == "llama":
        assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_scaling["factor"] == 8.0


@torch.no_grad()
def test_logits_match_transformers(hf_checkpoint):
    """fp32 logits of a right-padded batch equal transformers' per-prompt unpadded logits to 1e-4."""
    hf, path = hf_checkpoint
    ours = load_model(path)
    logits = ours.logits(ours(right_pad(PROMPTS, 0)[0]))
    for i, p in enumerate(PROMPTS):
        ref = hf(torch.tensor([p])).logits[0]
        assert ref.std() > 0.5  # discriminative, not near-uniform
        assert (logits[i, :len(p)] - ref).abs().max() <= 1e-4


def test_gradients_match_transformers(hf_checkpoint):
    """Every parameter's gradient of a next-token loss equals transformers'; tied embeddings (whose lookup
    gradient is sparse) end with one dense .grad, accumulate over two backward passes, and AdamW steps."""
    hf, path = hf_checkpoint
    ours = load_model(path).train()
    hf = hf.train()
    ids = right_pad(PROMPTS, 0)[0][:, :9]  # the shortest prompt has 9 tokens: no padding in the loss

    def loss_of(logits):
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    hf.zero_grad(set_to_none=True)
    loss_of(hf(ids).logits).backward()
    loss_of(ours.logits(ours(ids))).backward()
    theirs = {n.removeprefix("model."): p.grad for n, p in hf.named_parameters()}
    for name, p in ours.named_parameters():
        assert not p.grad.is_sparse, name
        assert p.grad.abs().max() > 0, name
        torch.testing.assert_close(p.grad, theirs[name], atol=1e-5, rtol=1e-4, msg=name)
    emb = ours.embed_tokens.weight
    assert ours.embed_tokens.sparse == ours.config.tie_word_embeddings
    first = emb.grad.clone()
    loss_of(ours.logits(ours(ids))).backward()  # accumulates into the existing dense .grad
    torch.testing.assert_close(emb.grad, 2 * first)
    before = emb.detach().clone()
    torch.optim.AdamW(ours.parameters(), lr=1e-3).step()
    assert not torch.equal(emb.detach(), before)
    hf.zero_grad(set_to_none=True), hf.eval()  # the fixture is shared with the other tests


@torch.no_grad()
def test_greedy_generation_matches_transformers(hf_checkpoint):
    """Greedy decoding with our KV cache gives transformers' 32 tokens, token for token."""
    hf, path = hf_checkpoint
    gen = generate(load_model(path), PROMPTS, GREEDY)
    assert gen.lengths.tolist() == [32] * 3 and gen.truncated.all()
    for i, p in enumerate(PROMPTS):
        out = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=32, min_new_tokens=32,
                          pad_token_id=0)
        assert gen.completions()[i] == out[0, len(p):].tolist()


@torch.no_grad()
def test_saved_checkpoint_loads_in_transformers(hf_checkpoint, tmp_path):
    """What save_model writes loads in AutoModelForCausalLM with no missing keys and the same logits."""
    from transformers import AutoModelForCausalLM

    hf, path = hf_checkpoint
    ours = load_model(path)
    save_model(ours, tmp_path / "ours")
    back, info = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert type(back) is type(hf)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = torch.tensor([PROMPTS[0]])
    assert (back.eval()(ids).logits - hf(ids).logits).abs().max() <= 1e-4


@torch.no_grad()
def test_sharded_checkpoint_loads(hf_checkpoint, tmp_path):
    """A checkpoint split into shards with a model.safetensors.index.json loads to the same weights."""
    hf, path = hf_checkpoint
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (tmp_path / "model.safetensors").exists()
    a, b = load_model(path).state_dict(), load_model(tmp_path).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -----------------------------------------------------------------------------
# Checkpoints: config parsing, errors, round trips


def llama_dict(**extra) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, **extra}


def test_rope_theta_from_top_level_and_from_rope_parameters():
    """rope_theta is read from the top level (transformers 4) and from rope_parameters (transformers 5)."""
    assert ModelConfig.from_hf(llama_dict(rope_theta=500000.0)).rope_theta == 500000.0
    v5 = ModelConfig.from_hf(llama_dict(rope_parameters={"rope_theta": 1e6, "rope_type": "default"}))
    assert v5.rope_theta == 1e6 and v5.rope_scaling is None
    assert ModelConfig.from_hf(llama_dict()).rope_theta == 10000.0
    v4 = ModelConfig.from_hf(llama_dict(rope_theta=5e5, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}))
    assert v4.rope_theta == 5e5 and v4.rope_scaling["rope_type"] == "llama3"


@pytest.mark.parametrize("kw", [
    dict(arch="qwen2", qkv_bias=True),
    dict(arch="llama", tie_word_embeddings=False, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}),
    dict(arch="qwen3", head_dim=24, rope_theta=1e6),
])
def test_config_to_hf_round_trip(kw):
    """from_hf(to_hf(cfg)) gives back the same ModelConfig for each architecture."""
    cfg = ModelConfig(**kw)
    back = ModelConfig.from_hf(json.loads(json.dumps(cfg.to_hf())))
    if back.rope_scaling:  # to_hf folds rope_theta into the scaling dict; compare the rest
        back.rope_scaling = {k: v for k, v in back.rope_scaling.items() if k != "rope_theta"}
    assert back == cfg


def test_smollm2_config_parses(smollm2_dir):
    """The real SmolLM2 config.json (transformers 5 layout) parses to its known hyper-parameters."""
    cfg = load_config(smollm2_dir)
    assert (cfg.arch, cfg.rope_theta, cfg.head_dim, cfg.tie_word_embeddings) == ("llama", 100000.0, 64, True)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.num_layers, cfg.vocab_size) == (9, 3, 30, 49152)
    assert cfg.rope_scaling is None and not cfg.qkv_bias


def _edit_config(path: Path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **changes}))


def _edit_tensors(path: Path, drop=(), add=None):
    from safetensors.torch import load_file, save_file
    state = load_file(path / "model.safetensors")
    for k in drop:
        del state[k]
    save_file({**state, **(add or {})}, path / "model.safetensors")


def _truncate(file: Path, keep: int | None = None) -> Path:
    """Cut `file` to `keep` bytes (default half), as an interrupted download leaves it."""
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2 if keep is None else keep])
    return file


def _write_pickle(path: Path):
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"\x80\x04 not a real pickle, and never opened")


BAD_CHECKPOINTS = {
    "missing directory": (lambda p: p.rename(p.with_name("gone")), ["not a checkpoint directory"]),
    "missing config.json": (lambda p: (p / "config.json").unlink(), ["config.json", "not found"]),
    "invalid config.json": (lambda p: (p / "config.json").write_text("{oops"), ["config.json", "invalid JSON"]),
    "missing field": (lambda p: _strip(p, "vocab_size"), ["missing field", "vocab_size"]),
    "missing weights": (lambda p: (p / "model.safetensors").unlink(), ["no model.safetensors"]),
    "missing tensor": (lambda p: _edit_tensors(p, drop=["model.layers.1.mlp.up_proj.weight"]),
                       ["missing", "layers.1.mlp.up_proj.weight"]),
    "unexpected tensor": (lambda p: _edit_tensors(p, add={"model.layers.0.extra.weight": torch.zeros(2)}),
                          ["unexpected", "model.layers.0.extra.weight"]),
    "wrong shape": (lambda p: _edit_config(p, hidden_size=64), ["wrong shape", "embed_tokens.weight"]),
    "mistral": (lambda p: _edit_config(p, architectures=["MistralForCausalLM"]),
                ["MistralForCausalLM", "not supported"]),
    "gpt2": (lambda p: _edit_config(p, architectures=["GPT2LMHeadModel"]), ["GPT2LMHeadModel", "not supported"]),
    "rope type": (lambda p: _edit_config(p, rope_parameters={"rope_type": "yarn", "factor": 4.0}), ["yarn"]),
    "sliding window": (lambda p: _edit_config(p, use_sliding_window=True), ["sliding"]),
    "pickle weights": (_write_pickle, ["pytorch_model.bin", "safetensors", "pickle"]),
    # an interrupted download: cut inside the tensor data, and inside the 8-byte header length
    "truncated weights": (lambda p: _truncate(p / "model.safetensors"),
                          ["model.safetensors: incomplete or corrupt safetensors file", "interrupted download"]),
    "truncated header": (lambda p: _truncate(p / "model.safetensors", keep=4),
                         ["model.safetensors: incomplete or corrupt safetensors file", "header"]),
    "zero heads": (lambda p: _edit_config(p, num_attention_heads=0),
                   ["'num_attention_heads' must be a positive integer, not 0"]),
    "string size": (lambda p: _edit_config(p, hidden_size="32"), ["'hidden_size' must be a positive integer, not '32'"]),
    "heads vs kv heads": (lambda p: _edit_config(p, num_key_value_heads=3), ["not a multiple of num_key_value_heads 3"]),
    "negative eps": (lambda p: _edit_config(p, rms_norm_eps=-1), ["'rms_norm_eps' must be a positive number"]),
    # weights that load but cannot be right: a diverged run's, a quantised checkpoint's
    "nan weights": (lambda p: _edit_tensors(p, add={"model.norm.weight": torch.full((32,), math.nan)}),
                    ["model.safetensors: tensor model.norm.weight holds NaN or infinite values"]),
    "int8 weights": (lambda p: _edit_tensors(p, add={"model.norm.weight": torch.ones(32, dtype=torch.int8)}),
                     ["model.safetensors: tensor model.norm.weight is torch.int8, not floating point"]),
}


def _strip(path: Path, key: str):
    cfg = json.loads((path / "config.json").read_text())
    del cfg[key]
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_raises_checkpoint_error_naming_the_problem(case, tmp_path):
    """Each broken checkpoint is a CheckpointError whose message names the file and what is wrong."""
    path = tmp_path / "ckpt"
    # hidden 32 tensors: the "wrong shape" case then claims hidden 64 in config.json
    save_model(Transformer(ModelConfig(hidden_size=32, head_dim=8)), path)
    corrupt, words = BAD_CHECKPOINTS[case]
    corrupt(path)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    message = str(err.value)
    assert str(path) in message
    for word in words:
        assert word in message, f"{case}: {word!r} not in {message!r}"


def test_truncated_optimizer_state_raises_checkpoint_error(tmp_path):
    """A training checkpoint whose optimizer.safetensors was cut short is a one-line CheckpointError naming it."""
    model = tiny_model(std=None)
    opt = torch.optim.AdamW(model.parameters())
    model.logits(model(torch.tensor([PROMPTS[2]]))).sum().backward()
    opt.step()  # AdamW has moments to save only after a step
    save_checkpoint(tmp_path / "ckpt", model, None, opt, TrainerState(), {})
    load_optimizer(tmp_path / "ckpt", torch.optim.AdamW(model.parameters()))  # whole, it loads
    file = _truncate(tmp_path / "ckpt" / "optimizer.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_optimizer(tmp_path / "ckpt", torch.optim.AdamW(model.parameters()))
    message = str(err.value)
    assert message.startswith(f"{file}: incomplete or corrupt safetensors file") and "\n" not in message


def _adamw_checkpoint(path: Path):
    """A tiny model and a training checkpoint of it after one AdamW step; returns the model."""
    model = tiny_model(std=None)
    opt = torch.optim.AdamW(model.parameters())
    model.logits(model(torch.tensor([PROMPTS[2]]))).sum().backward()
    opt.step()
    save_checkpoint(path, model, None, opt, TrainerState(), {})
    return model


def _edit_moments(path: Path, edit):
    from safetensors.torch import load_file, save_file
    f = path / "optimizer.safetensors"
    state = load_file(f)
    edit(state)
    save_file(state, f)


BAD_MOMENTS = {  # AdamW used to restart from zero moments (or fail at its first step) without a word
    "wrong shape": (lambda s: s.update({"0.exp_avg": torch.zeros(3, 3)}), "0.exp_avg has shape (3, 3), but parameter 0"),
    "missing": (lambda s: s.pop("1.exp_avg_sq"), "no AdamW state for 1 of the"),
    "empty": (lambda s: s.clear(), "no AdamW state for"),
    "nan": (lambda s: s["0.exp_avg"].fill_(math.nan), "0.exp_avg holds NaN or infinite values"),
    "stranger": (lambda s: s.update({"999.exp_avg": torch.zeros(1)}), "999.exp_avg is not an AdamW state"),
}


@pytest.mark.parametrize("case", list(BAD_MOMENTS))
def test_adamw_moments_that_do_not_fit_are_refused(case, tmp_path):
    """Moments of the wrong shape, missing, an optimizer file without tensors, non-finite, or of a
    parameter this model lacks: one CheckpointError naming optimizer.safetensors."""
    model = _adamw_checkpoint(tmp_path / "ckpt")
    _edit_moments(tmp_path / "ckpt", BAD_MOMENTS[case][0])
    with pytest.raises(CheckpointError) as err:
        load_optimizer(tmp_path / "ckpt", torch.optim.AdamW(model.parameters()))
    assert str(err.value).startswith(f"{tmp_path / 'ckpt' / 'optimizer.safetensors'}: ")
    assert BAD_MOMENTS[case][1] in str(err.value) and "\n" not in str(err.value)


BAD_STATES = {  # trainer_state.json edited or damaged: (field, value, what the message says it must be)
    "step abc": ("step", "abc", "field 'step' is \"abc\", not a whole number >= 0"),
    "step -3": ("step", -3, "field 'step' is -3, not a whole number >= 0"),
    "step 1.5": ("step", 1.5, "field 'step' is 1.5, not a whole number >= 0"),
    "args list": ("args", [], "field 'args' is [], not an object of flags"),
    "best incomplete": ("best", {"step": 2}, "field 'best' is {\"step\": 2}, not null or {step, mae, path}"),
    "sft_step": ("sft_step", "2", "field 'sft_step' is \"2\", not a whole number >= 0 or null"),
    "lr fast": ("args", {"lr": "fast"}, "field 'args.lr' is \"fast\", not float"),
}


@pytest.mark.parametrize("case", list(BAD_STATES))
def test_a_damaged_trainer_state_is_one_line_naming_file_and_field(case, tmp_path, capsys):
    """A step "abc", -3 or 1.5, args as a list, an incomplete best, a flag of the wrong type: --resume
    stops with one line naming trainer_state.json and the field (they used to be tracebacks)."""
    from plumbing.cli import parse_args

    _adamw_checkpoint(tmp_path / "ckpt")
    f = tmp_path / "ckpt" / "trainer_state.json"
    field, value, message = BAD_STATES[case]
    f.write_text(json.dumps({**json.loads(f.read_text()), field: value}))
    with pytest.raises(SystemExit) as stop:
        parse_args(["--resume", str(tmp_path / "ckpt")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err == f"train.py: error: {f}: {message}\n"


def test_a_cut_tokenizer_file_is_one_line(tmp_path):
    """A truncated tokenizer.json (an interrupted download) used to be the tokenizers library's traceback."""
    from model import Tokenizer
    from plumbing.tokenizer import train_bpe

    train_bpe(["the user likes drama"] * 20, tmp_path / "tok", vocab_size=300)
    _truncate(tmp_path / "tok" / "tokenizer.json")
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'tok' / 'tokenizer.json'}: unreadable"):
        Tokenizer(tmp_path / "tok")


def test_bf16_round_trip_keeps_dtype_and_values(tmp_path):
    """A bf16 model saves bf16 tensors and loads back (dtype=bf16) bit for bit, same logits."""
    from safetensors import safe_open

    model = tiny_model(arch="llama", qkv_bias=False, tie_word_embeddings=False).to(torch.bfloat16)
    save_model(model, tmp_path / "bf16")
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    back = load_model(tmp_path / "bf16", dtype=torch.bfloat16)
    assert {p.dtype for p in back.parameters()} == {torch.bfloat16}
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids, _ = right_pad(PROMPTS, 0)
    with torch.no_grad():
        assert torch.equal(model.logits(model(ids)), back.logits(back(ids)))


def test_gradient_checkpointing_gives_same_loss_and_gradients(monkeypatch):
    """With gradient_checkpointing the loss and every gradient equal those of the plain backward pass."""
    model = tiny_model(arch="qwen3", qkv_bias=False, head_dim=24).train()
    ids = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(0))

    def loss_and_grads():
        model.zero_grad()
        logits = model.logits(model(ids))
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_loss, plain_grads = loss_and_grads()
    calls = []
    real = model_module.checkpoint
    monkeypatch.setattr(model_module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    model.gradient_checkpointing = True
    ckpt_loss, ckpt_grads = loss_and_grads()
    assert len(calls) == model.config.num_layers  # it really recomputed each block
    torch.testing.assert_close(ckpt_loss, plain_loss, atol=1e-6, rtol=0)
    for n in plain_grads:
        torch.testing.assert_close(ckpt_grads[n], plain_grads[n], atol=1e-6, rtol=1e-5)


# -----------------------------------------------------------------------------
# The speed benchmark must keep running


def test_benchmark_runs_in_quick_mode(tmp_path, monkeypatch):
    """bench_model.py --quick runs every workload with positive timings; --workloads train --profile too."""
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("bench_model", ROOT / "benchmarks" / "bench_model.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_model", bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        bench.main(["--quick", "--threads", "1", "--repeats", "1", "--json", str(tmp_path / "r.json")])
        results = json.loads((tmp_path / "r.json").read_text())["results"]
        assert {r["workload"] for r in results} == {"fwd+bwd fp32", "sample fp32", "sample bf16"}
        assert all(r["ours_s"] > 0 and r["theirs_s"] > 0 and math.isfinite(r["ratio"]) for r in results)
        assert all(len(r["ours_runs_s"]) == len(r["theirs_runs_s"]) == 1 for r in results)
        train_only = bench.main(["--quick", "--threads", "1", "--repeats", "1", "--workloads", "train",
                                 "--profile", "--dense-lookup-grad"])
        assert [r["workload"] for r in train_only] == ["fwd+bwd fp32"]
        for side in ("ours", "transformers"):
            split = train_only[0][f"profile_{side}"]
            assert split["matmul_s"] > 0 and split["other_s"] > 0 and split["top_other"]
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16])
def test_cpu_attention_runs_in_fp32_when_computing_in_bf16(monkeypatch, weights):
    """A CPU's bf16 attention kernel is slower than its fp32 one (5.7x for one decoding step on an AVX512-BF16
    EPYC, 10% for a prefill): under bf16 autocast, and with bf16 weights, the model attends in fp32 and
    hands the linear layers bf16 again, in prefill and in decoding."""
    from model import SamplingConfig, generate

    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8)
    torch.manual_seed(0)
    model = Transformer(cfg).to(weights).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=weights == torch.float32):
        out = generate(model, [[1, 2, 3, 4], [5, 6]], SamplingConfig(max_new_tokens=3, temperature=1.0), 2,
                       torch.Generator().manual_seed(0))
        h = model(torch.tensor([[1, 2, 3]]))
    assert seen and all(d == (torch.float32,) * 3 for d in seen)
    assert out.tokens.shape[0] == 4 and h.dtype in (torch.float32, torch.bfloat16)
