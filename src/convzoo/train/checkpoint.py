"""Checkpoints: one safetensors file holding the weights and the training state, written atomically.

Tensors go into the safetensors body under ``model.``, ``ema.`` and ``state.`` prefixes;
everything else (config, epoch, step, the non-tensor leaves of optimizer/scheduler state)
is JSON in the file's metadata, with each tensor leaf replaced by a ``{"__tensor__": key}``
reference. Loading parses JSON and safetensors only: nothing is ever unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import Tensor

from convzoo.atomic_files import atomic_path

FORMAT = "convzoo-checkpoint-1"


def flatten_state(state: Any, prefix: str, tensors: dict[str, Tensor]) -> Any:
    """A JSON-able copy of ``state`` with tensors moved into ``tensors`` (keys start with ``prefix``)."""
    if isinstance(state, Tensor):
        key = f"{prefix}{len(tensors)}"
        tensors[key] = state.detach().cpu().clone(memory_format=torch.contiguous_format)
        return {"__tensor__": key}
    if isinstance(state, dict):
        if not all(isinstance(k, str | int) for k in state):
            raise TypeError(f"state keys must be str or int, got {list(state)[:5]}")
        return {"__dict__": [[k, flatten_state(v, prefix, tensors)] for k, v in state.items()]}
    if isinstance(state, list | tuple):
        return {"__list__": [flatten_state(v, prefix, tensors) for v in state], "tuple": isinstance(state, tuple)}
    if state is None or isinstance(state, bool | int | float | str):
        return state
    raise TypeError(f"cannot store a {type(state).__name__} in a checkpoint")


def unflatten_state(skeleton: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of ``flatten_state``."""
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {k: unflatten_state(v, tensors) for k, v in skeleton["__dict__"]}
        if "__list__" in skeleton:
            items = [unflatten_state(v, tensors) for v in skeleton["__list__"]]
            return tuple(items) if skeleton.get("tuple") else items
    return skeleton


@dataclass
class Checkpoint:
    """What a checkpoint file holds.

    Attributes:
        model: the model's state dict (unwrapped, no DDP ``module.`` prefix).
        meta: JSON-able run facts: model, conv, num_classes, config, epoch, step, metrics.
        ema: the EMA model's state dict, if any.
        state: JSON-able + tensors training state (optimizer, scheduler, scaler, RNG).
    """

    model: dict[str, Tensor]
    meta: dict[str, Any]
    ema: dict[str, Tensor] | None = None
    state: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    tensors: dict[str, Tensor] = {}
    for name, value in checkpoint.model.items():
        tensors[f"model.{name}"] = value.detach().cpu().clone(memory_format=torch.contiguous_format)
    for name, value in (checkpoint.ema or {}).items():
        tensors[f"ema.{name}"] = value.detach().cpu().clone(memory_format=torch.contiguous_format)
    skeleton = flatten_state(checkpoint.state, "state.", tensors)
    metadata = {
        "format": FORMAT,
        "meta": json.dumps(checkpoint.meta),
        "state": json.dumps(skeleton),
        "has_ema": json.dumps(checkpoint.ema is not None),
    }
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
    return path


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint written by ``save_checkpoint`` (or a bare safetensors state dict of weights)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    # One read of the whole file: safetensors' own loader opens the path twice (header, then tensors),
    # so a save_checkpoint replacing the file in between (a run writing while another process reads)
    # could pair one file's header with the other's data.
    data = path.read_bytes()
    try:
        header_size = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_size]).get("__metadata__") or {}
        tensors = {key: value.to(map_location) for key, value in load_safetensors(data).items()}
    except Exception as error:  # safetensors raises its own error type for a damaged or foreign file
        raise ValueError(f"{path} is not a readable safetensors checkpoint: {error}") from None
    if metadata.get("format") != FORMAT:
        return Checkpoint(model=tensors, meta={})
    model = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    ema = {k[len("ema.") :]: v for k, v in tensors.items() if k.startswith("ema.")}
    state = unflatten_state(json.loads(metadata["state"]), tensors)
    return Checkpoint(model, json.loads(metadata["meta"]), ema if json.loads(metadata["has_ema"]) else None, state)
