"""Training checkpoints: the model in the Hugging Face layout plus optimizer state, in one atomic directory.

A checkpoint directory is a loadable model (config.json, model.safetensors, tokenizer files) with two
more files: optimizer.safetensors (AdamW moments) and trainer_state.json (step, param groups, run
arguments). It is written to a temporary directory that is then renamed into place, so a killed run
leaves the previous checkpoint intact. Nothing is pickled.
"""

from __future__ import annotations

import json
from pathlib import Path

from model import save_model


def save_checkpoint(path: Path, model, tok_dir, optimizer, state: dict):
    """Model (safetensors + config), tokenizer, AdamW moments (safetensors) and trainer_state.json,
    written to a temporary directory and renamed into place: a killed run leaves the previous one."""
    from safetensors.torch import save as st_save

    opt = optimizer.state_dict()
    tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, s in opt["state"].items() for k, v in s.items()}
    state = {**state, "param_groups": opt["param_groups"]}
    save_model(model, path, tok_dir, extra_files={"optimizer.safetensors": st_save(tensors),
                                                  "trainer_state.json": json.dumps(state, indent=1)})


def load_optimizer(path: Path, optimizer) -> None:
    """Restore AdamW moments and param groups written by save_checkpoint (no pickle involved)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path / "optimizer.safetensors"))
    state = {}
    for key, value in tensors.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = value
    groups = json.loads((path / "trainer_state.json").read_text())["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
