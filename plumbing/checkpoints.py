"""Weights on disk: Hugging Face checkpoint folders in and out, and resumable training checkpoints.

load_model / save_model read and write the layout `transformers` uses (config.json, model.safetensors
or a sharded index, tokenizer files), so a checkpoint from the hub loads here and what we save loads
in `transformers` with the same logits. Only safetensors are read: a pickle can run arbitrary code,
so *.bin / *.pt files are never opened.

A training checkpoint is such a folder with two more files: optimizer.safetensors (AdamW moments)
and trainer_state.json (the TrainerState, the run's flags, the optimizer's param groups). Every
folder is written to a temporary directory first and renamed into place (plumbing/runs.py), so a
killed run leaves the previous checkpoint whole. A model sharded with FSDP is saved whole, the same
folder (plumbing/parallel.py).

Whatever is read is checked before it is used, and a file that fails is named in one line
(CheckpointError): weights that are not floating point or not finite, AdamW moments that do not
match the trained parameters, a trainer_state.json whose fields have the wrong type.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save, save_file

import lora
from model import (
    TOKENIZER_FILES,
    CheckpointError,
    ModelConfig,
    Transformer,
    rope_inv_freq,
)
from plumbing import parallel
from plumbing.runs import WriteError, write_text, written_dir

# -----------------------------------------------------------------------------
# Hugging Face checkpoint folders


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        missing = [s for s in shards if not (path / s).exists()]
        if missing:
            raise CheckpointError(f"{index}: shard file(s) missing: {', '.join(missing)}")
        return [path / s for s in shards]
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
    if pickles:
        raise CheckpointError(f"{path}: only pickle weights found ({', '.join(pickles)}); this project "
                              "loads safetensors only, because unpickling can run arbitrary code. Convert "
                              "them once with a tool you trust (e.g. transformers' save_pretrained).")
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _unreadable(f: Path, e: SafetensorError) -> CheckpointError:
    # the library's message ("incomplete metadata, file not fully covered") does not name the file
    return CheckpointError(f"{f}: incomplete or corrupt safetensors file (an interrupted download?): {e}")


def load_config(path) -> ModelConfig:
    """Read `path/config.json` into a ModelConfig."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    f = path / "config.json"
    if not f.exists():
        raise CheckpointError(f"{f}: file not found")
    try:
        return ModelConfig.from_hf(json.loads(f.read_text()), str(f))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: invalid JSON ({e})") from None


def load_model(path, dtype=torch.float32, device="cpu") -> Transformer:
    """Build the model on the meta device and assign the checkpoint's tensors, strictly by name and shape."""
    path = Path(path)
    cfg = load_config(path)
    files = _weight_files(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state, unexpected, bad_shape = {}, [], {}
    for f in files:
        try:  # safetensors checks at open that the header's offsets cover the file: a cut file fails here
            sf = safe_open(str(f), framework="pt", device=str(device))
        except SafetensorError as e:
            raise _unreadable(f, e) from None
        with sf:
            for name in sf.keys():
                key = name.removeprefix("model.")
                if key == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue  # some tied checkpoints store the head too; ours is the embedding
                if key not in expected:
                    unexpected.append(name)
                    continue
                shape = tuple(sf.get_slice(name).get_shape())
                if shape != tuple(expected[key]):
                    bad_shape[key] = f"{name} {shape} (expected {tuple(expected[key])})"
                    continue
                tensor = sf.get_tensor(name)
                if not tensor.is_floating_point():  # int8 & co: a quantised checkpoint, which would load as garbage
                    raise CheckpointError(f"{f}: tensor {name} is {tensor.dtype}, not floating point (a quantised "
                                          "checkpoint? this project loads fp32, bf16 or fp16 weights)")
                if not torch.isfinite(tensor).all():
                    raise CheckpointError(f"{f}: tensor {name} holds NaN or infinite values (the weights of a "
                                          "diverged run?)")
                state[key] = tensor.to(dtype)
    missing = sorted(set(expected) - set(state) - set(bad_shape))
    problems = [f"missing: {', '.join(missing)}"] * bool(missing) + \
        [f"unexpected: {', '.join(unexpected)}"] * bool(unexpected) + \
        [f"wrong shape: {', '.join(bad_shape.values())}"] * bool(bad_shape)
    if problems:
        raise CheckpointError(f"{path}: weights do not match config.json; " + "; ".join(problems))
    model.load_state_dict(state, strict=True, assign=True)
    model.inv_freq = rope_inv_freq(cfg).to(device)  # buffers are not in the file: rebuild off meta
    return model.to(device).eval()


def save_model(model: Transformer, path, tokenizer_dir=None, extra_files: dict | None = None):
    """Write config.json + model.safetensors (+ tokenizer files) in the Hugging Face layout, atomically.
    In a torchrun job every rank calls it (a sharded model's tensors are gathered from all ranks) and
    rank 0 writes."""
    weights = parallel.full_state_dict(model)
    if weights is None:  # not rank 0
        return
    write_model(model, weights, path, tokenizer_dir, extra_files)


def write_model(model: Transformer, weights: dict[str, torch.Tensor], path, tokenizer_dir=None,
                extra_files: dict | None = None):
    """save_model's writing half: `weights` is the model's whole state dict (adapters merged here)."""
    path = Path(path)
    try:
        with written_dir(path) as tmp:
            (tmp / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2))
            adapters = lora.has_lora(model) and lora.adapter_config(model)
            merged = lora.merged_state_dict(weights, adapters["lora_alpha"] / adapters["r"]) if adapters else weights
            state = {("" if k == "lm_head.weight" else "model.") + k: v.detach().contiguous().cpu()
                     for k, v in merged.items()}
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            if adapters:  # the adapters on their own too: what a resumed run trains on
                save_file({k: v.detach().contiguous().cpu() for k, v in lora.adapter_state_dict(weights).items()},
                          str(tmp / "adapter_model.safetensors"))
                (tmp / "adapter_config.json").write_text(json.dumps(adapters, indent=1))
            if tokenizer_dir is not None:
                for name in TOKENIZER_FILES:
                    if (Path(tokenizer_dir) / name).exists():
                        shutil.copy(Path(tokenizer_dir) / name, tmp / name)
            for name, payload in (extra_files or {}).items():
                (tmp / name).write_bytes(payload if isinstance(payload, bytes) else payload.encode())
    except WriteError as e:  # a full disk, most often: one line, and the previous checkpoint is untouched
        raise CheckpointError(str(e)) from None


# -----------------------------------------------------------------------------
# Training checkpoints


@dataclass
class BestSoFar:
    """--select best: the evaluation with the lowest validation MAE so far, and where its weights are."""

    step: int
    mae: float
    path: str


@dataclass
class TrainerState:
    """What a resumed run needs besides the weights and AdamW's moments (kept in trainer_state.json)."""

    step: int = 0  # GRPO steps taken
    start_test: dict | None = None  # test metrics of the model GRPO started from (a RatingMetrics as a dict):
    # the cold start in RecOne, the given model in RecZero
    start_model: str | None = None  # the frozen reference policy for --beta > 0: the cold start or --model
    best: BestSoFar | None = None
    data_fingerprint: str | None = None  # experiment.fingerprint of the task it trained on
    sft_step: int | None = None  # set while RecOne's cold-start SFT runs: the batches it has done
    sft_traces: str | None = None  # the cold-start traces (JSONL), so a resumed SFT needs no teacher
    notes: list[str] = field(default_factory=list)  # warnings results.md repeats (plumbing/collapse.py)
    validation_due: bool = False  # a stop request abandoned this step's validation: --resume does it first
    tested: bool = False  # the final test has been written (a run stopped during it is resumed to do it)

    @staticmethod
    def read(path) -> TrainerState:
        """The TrainerState in `path/trainer_state.json`."""
        saved = read_trainer_state(path)
        best = saved.get("best")
        start_test = saved.get("start_test", saved.get("cold_start"))  # "cold_start" before 2026-12
        return TrainerState(saved["step"], start_test, saved.get("start_model"),
                            BestSoFar(**best) if best else None, saved.get("data_fingerprint"),
                            saved.get("sft_step"), saved.get("sft_traces"), saved.get("notes") or [],
                            bool(saved.get("validation_due")), saved.get("tested", True))


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _best(value) -> bool:
    return (isinstance(value, dict) and set(value) == {"step", "mae", "path"} and _count(value["step"])
            and isinstance(value["mae"], (int, float)) and math.isfinite(value["mae"])
            and isinstance(value["path"], str))


# What each field of trainer_state.json must be, as save_checkpoint writes it (the flags in args are
# checked by plumbing/cli.py, which knows their types)
_STATE_FIELDS = {
    "step": (_count, "a whole number >= 0"),
    "param_groups": (lambda v: isinstance(v, list), "a list"),
    "args": (lambda v: isinstance(v, dict), "an object of flags"),
    "sft_step": (lambda v: v is None or _count(v), "a whole number >= 0 or null"),
    "start_test": (lambda v: v is None or isinstance(v, dict), "an object or null"),
    "cold_start": (lambda v: v is None or isinstance(v, dict), "an object or null"),
    "best": (lambda v: v is None or _best(v), "null or {step, mae, path}"),
    **{name: (lambda v: v is None or isinstance(v, bool), "true, false or null")
       for name in ("validation_due", "tested")},
    "notes": (lambda v: v is None or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
              "a list of strings or null"),
    **{name: (lambda v: v is None or isinstance(v, str), "a string or null")
       for name in ("start_model", "data_fingerprint", "sft_traces")},
}


def read_trainer_state(path) -> dict:
    """trainer_state.json as written by save_checkpoint; a missing or cut file, or a field of the
    wrong type, is a CheckpointError naming the file and the field."""
    f = Path(path) / "trainer_state.json"
    try:
        saved = json.loads(f.read_text())
        if not isinstance(saved, dict) or not {"step", "param_groups", "args"} <= set(saved):
            raise ValueError("fields step, param_groups or args missing")
    except FileNotFoundError:
        raise CheckpointError(f"{f}: missing (not a training checkpoint written by train.py)") from None
    except (json.JSONDecodeError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: unreadable, so the checkpoint is incomplete ({e})") from None
    for name, (ok, what) in _STATE_FIELDS.items():
        if not ok(saved.get(name)):
            raise CheckpointError(f"{f}: field '{name}' is {json.dumps(saved.get(name))[:80]}, not {what}")
    return saved


def save_checkpoint(path: Path, model, tok_dir, optimizer, state: TrainerState, flags: dict):
    """Model (safetensors + config), tokenizer, AdamW moments (safetensors) and trainer_state.json
    (the state, the run's flags, the param groups), written atomically."""
    weights, opt = parallel.full_state_dict(model), parallel.full_optimizer_state(optimizer)
    if weights is None:  # not rank 0: it took part in the gathers
        return
    tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, s in opt["state"].items() for k, v in s.items()}
    saved = {**asdict(state), "args": flags, "param_groups": opt["param_groups"]}
    write_model(model, weights, path, tok_dir, extra_files={"optimizer.safetensors": save(tensors),
                                                            "trainer_state.json": json.dumps(saved, indent=1)})


def mark_tested(path) -> None:
    """Record in path/trainer_state.json that the run's final test is written: a --resume with no more
    steps then has nothing to do (before, it finishes the test a stop request abandoned)."""
    f = Path(path) / "trainer_state.json"
    saved = json.loads(f.read_text())
    saved["tested"] = True
    write_text(f, json.dumps(saved, indent=1))


def load_adapters(path, model) -> None:
    """Load adapter_model.safetensors (written by save_model for a model with LoRA) into `model`,
    whose adapters must have the same names and shapes."""
    f = Path(path) / "adapter_model.safetensors"
    saved = _read_tensors(f, "a --lora-rank run needs the adapters it trained")
    own = lora.adapter_state_dict(model.state_dict())
    if set(saved) != set(own) or any(saved[k].shape != own[k].shape for k in own):
        raise CheckpointError(f"{f}: adapters do not match --lora-rank / --lora-targets of this run")
    model.load_state_dict(saved, strict=False)


def _read_tensors(f: Path, why_needed: str) -> dict[str, torch.Tensor]:
    """A safetensors file of a training checkpoint; missing or cut is a CheckpointError naming it."""
    if not f.exists():
        raise CheckpointError(f"{f}: missing, so the checkpoint is incomplete ({why_needed})")
    try:
        return load_file(str(f))
    except SafetensorError as e:
        raise _unreadable(f, e) from None


ADAMW_STATE = ("step", "exp_avg", "exp_avg_sq")  # per parameter, as torch's AdamW keeps it


def load_optimizer(path: Path, optimizer) -> None:
    """Restore the AdamW moments written by save_checkpoint (no pickle involved). The optimizer keeps its
    own hyper-parameters (lr, betas): they come from this run's flags, so --resume-override lr applies.
    Every trained parameter must have its moments, of its shape and finite: AdamW would otherwise
    restart from zero moments without a word (a missing entry) or fail at its first step."""
    f = Path(path) / "optimizer.safetensors"
    params = [p for group in optimizer.param_groups for p in group["params"]]  # the state's indices
    state = {}
    for key, value in _read_tensors(f, "weights without AdamW's state").items():
        i, _, name = key.partition(".")
        if not (i.isdigit() and int(i) < len(params) and name in ADAMW_STATE):
            raise CheckpointError(f"{f}: {key} is not an AdamW state of this run's {len(params)} trained "
                                  "parameters (another model, or other --lora-rank / --lora-targets?)")
        want = () if name == "step" else tuple(params[int(i)].shape)
        if tuple(value.shape) != want:
            raise CheckpointError(f"{f}: {key} has shape {tuple(value.shape)}, but parameter {i} has shape {want} "
                                  "(another model, or other --lora-rank / --lora-targets?)")
        if not torch.isfinite(value).all():
            raise CheckpointError(f"{f}: {key} holds NaN or infinite values")
        if name != "step":  # a moment: sharded like its weight
            value = parallel.shard_like(params[int(i)], value)
        state.setdefault(int(i), {})[name] = value
    incomplete = [i for i in range(len(params)) if set(state.get(i, ())) != set(ADAMW_STATE)]
    if incomplete:
        raise CheckpointError(f"{f}: no AdamW state for {len(incomplete)} of the {len(params)} trained parameters "
                              f"(first: parameter {incomplete[0]}), so the checkpoint is incomplete")
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
