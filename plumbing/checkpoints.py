"""Weights on disk: Hugging Face checkpoint folders in and out, and resumable training checkpoints.

load_model / save_model read and write the layout `transformers` uses (config.json, model.safetensors
or a sharded index, tokenizer files), so a checkpoint from the hub loads here and what we save loads
in `transformers` with the same logits. Only safetensors are read: a pickle can run arbitrary code,
so *.bin / *.pt files are never opened.

A training checkpoint is such a folder with two more files: optimizer.safetensors (AdamW moments)
and trainer_state.json (the TrainerState, the run's flags, the optimizer's param groups). Every
folder is written to a temporary directory first and renamed into place, so a killed run leaves the
previous checkpoint whole. A model sharded with FSDP is saved whole, the same folder (plumbing/parallel.py).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save, save_file

import lora
from model import CheckpointError, ModelConfig, Transformer, rope_inv_freq
from plumbing import parallel
from plumbing.tokenizer import TOKENIZER_FILES

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
                state[key] = sf.get_tensor(name).to(dtype)
    missing = sorted(set(expected) - set(state) - set(bad_shape))
    problems = [f"missing: {', '.join(missing)}"] * bool(missing) + \
        [f"unexpected: {', '.join(unexpected)}"] * bool(unexpected) + \
        [f"wrong shape: {', '.join(bad_shape.values())}"] * bool(bad_shape)
    if problems:
        raise CheckpointError(f"{path}: weights do not match config.json; " + "; ".join(problems))
    model.load_state_dict(state, strict=True, assign=True)
    model.inv_freq = rope_inv_freq(cfg).to(device)  # buffers are not in the file: rebuild off meta
    return model.to(device).eval()


def recover(path) -> Path:
    """A run killed between replace_dir's two renames leaves only `path.old`, the last whole
    checkpoint: put it back in place. Returns `path`."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    if not path.exists() and old.is_dir():
        try:
            os.replace(old, path)
            print(f"{path}: recovered from {old.name} (a run was killed while replacing it)")
        except FileNotFoundError:  # another rank of a torchrun job put it back first
            if not path.is_dir():
                raise
    return path


def _clean_leftovers(path: Path):
    """Remove temporary directories of earlier writes of `path` that a kill interrupted: on a full
    disk they would keep it full, and the next write would fail the same way."""
    for leftover in path.parent.glob(path.name + ".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def replace_dir(tmp: Path, final: Path):
    """Move a fully written directory into place; a crash leaves either the old or the new one."""
    final = Path(final)
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


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
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        recover(path)
        _clean_leftovers(path)
        tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent))
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
        replace_dir(tmp, path)
    except OSError as e:  # a full disk, most often: one line, and the previous checkpoint is untouched
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = " (the previous one is intact)" if path.exists() else ""
        raise CheckpointError(f"{path}: could not be written{kept}: {e.strerror or e}") from None


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
    cold_start: dict | None = None  # test metrics of the model GRPO started from (a RatingMetrics as a dict)
    start_model: str | None = None  # the frozen reference policy for --beta > 0: the cold start or --model
    best: BestSoFar | None = None
    data_fingerprint: str | None = None  # experiment.fingerprint of the task it trained on
    sft_step: int | None = None  # set while RecOne's cold-start SFT runs: the batches it has done
    sft_traces: str | None = None  # the cold-start traces (JSONL), so a resumed SFT needs no teacher

    @staticmethod
    def read(path) -> "TrainerState":
        """The TrainerState in `path/trainer_state.json`."""
        saved = read_trainer_state(path)
        best = saved.get("best")
        return TrainerState(saved["step"], saved.get("cold_start"), saved.get("start_model"),
                            BestSoFar(**best) if best else None, saved.get("data_fingerprint"),
                            saved.get("sft_step"), saved.get("sft_traces"))


def read_trainer_state(path) -> dict:
    """trainer_state.json as written by save_checkpoint; a missing or cut file is a CheckpointError."""
    f = Path(path) / "trainer_state.json"
    try:
        saved = json.loads(f.read_text())
        if not {"step", "param_groups", "args"} <= set(saved):
            raise ValueError("fields step, param_groups or args missing")
        return saved
    except FileNotFoundError:
        raise CheckpointError(f"{f}: missing (not a training checkpoint written by train.py)") from None
    except (json.JSONDecodeError, ValueError) as e:
        raise CheckpointError(f"{f}: unreadable, so the checkpoint is incomplete ({e})") from None


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


def load_optimizer(path: Path, optimizer) -> None:
    """Restore the AdamW moments written by save_checkpoint (no pickle involved). The optimizer keeps its
    own hyper-parameters (lr, betas): they come from this run's flags, so --resume-override lr applies."""
    params = [p for group in optimizer.param_groups for p in group["params"]]  # the state's indices
    state = {}
    for key, value in _read_tensors(Path(path) / "optimizer.safetensors", "weights without AdamW's state").items():
        i, name = key.split(".", 1)
        if int(i) < len(params) and value.shape == params[int(i)].shape:  # a moment: sharded like its weight
            value = parallel.shard_like(params[int(i)], value)
        state.setdefault(int(i), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
