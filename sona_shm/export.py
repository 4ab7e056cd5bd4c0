"""Export an engine's adapter as a PEFT LoRA adapter directory that ``peft`` loads as it is.

The adapter sona_shm learns maps ``x -> x + B A x s`` with ``A = down``
(``float32[rank, hidden_dim]``), ``B = up.T`` (``float32[hidden_dim, rank]``) and
``s = 1/sqrt(rank)``. In PEFT's terms that is a LoRA on a square ``Linear(h, h)`` whose
base weight is the identity: PEFT adds ``lora_B(lora_A(x)) * scaling`` to the base
layer's output, with ``scaling = lora_alpha / sqrt(r)`` under ``use_rslora`` (PEFT's
``LoraLayer.update_layer``), so ``lora_alpha = 1`` and ``use_rslora = true`` give
exactly ``s``. A model applies the engine's adapter where it has such an identity
``Linear`` named like the target module (``adapter`` by default)::

    class Adapted(torch.nn.Module):
        def __init__(self, h):
            super().__init__()
            self.adapter = torch.nn.Linear(h, h, bias=False)
            torch.nn.init.eye_(self.adapter.weight)      # the identity base

        def forward(self, x):
            return self.adapter(x)

    model = peft.PeftModel.from_pretrained(Adapted(h), "exported/")
    model(x)   # == client.forward(x), to float32 rounding

The directory holds what PEFT writes for a LoRA adapter:

- ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight`` F32
  ``[rank, hidden_dim]`` (``down``) and ``base_model.model.<module>.lora_B.weight`` F32
  ``[hidden_dim, rank]`` (``up`` transposed), with metadata ``format = pt`` and where it
  came from;
- ``adapter_config.json``: ``peft_type`` LORA, ``r``, ``lora_alpha`` 1, ``use_rslora``
  true, ``target_modules`` ``[<module>]``, ``task_type`` null, no dropout, no bias;
- with a route table, ``routes.npz`` (:data:`ROUTES_FILE`): ``vectors`` float32 ``[K, h]`` (the learned
  route vectors ``v_k``), ``bias`` float32 ``[K]`` (``b_k``), ``names``, ``retired`` (bool),
  ``given`` (each route's vector as given) and ``temperature``/``beta``, so that
  ``route()`` can be reproduced offline: ``f = model(x) / |model(x)|`` (the adapted query,
  normalised), ``score_k = f . v_k + (beta / temperature) b_k`` over the routes not retired,
  and the best score wins (``sona_shm.learn.routes``).

The checkpoint files of ``sona-shm checkpoint`` are another format (the Rust exporter's
``micro_lora_A``/``micro_lora_B`` names, plus pending gradients and counters): PEFT does
not load those; export them with ``from_checkpoint``.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import stat
from dataclasses import dataclass

import numpy as np

from .errors import CheckpointError, InvalidInputError
from .learn.routing import BETA
from .store.checkpoint import Checkpoint, engine_checkpoint, read_checkpoint
from .store.tensorfile import encode, write_atomic

#: The target module an export names unless told otherwise.
DEFAULT_MODULE = "adapter"
ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
ROUTES_FILE = "routes.npz"

_MODULE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")


@dataclass(frozen=True)
class PeftExport:
    """What :func:`export_peft` wrote."""

    directory: str
    module: str
    rank: int
    hidden_dim: int
    generation: int
    trajectories_processed: int
    files: tuple[str, ...]


def check_module(module: object) -> str:
    """``module`` if it is a dotted module path (``adapter``, ``layers.0.proj``), else raise naming it."""
    if not isinstance(module, str) or not _MODULE_RE.fullmatch(module):
        raise InvalidInputError(f"module: expected a dotted module path such as 'adapter' or 'layers.0.proj', got {module!r}")
    return module


def peft_tensors(checkpoint: Checkpoint, module: str = DEFAULT_MODULE) -> dict[str, np.ndarray]:
    """PEFT's names and shapes for the adapter of ``checkpoint``."""
    prefix = f"base_model.model.{check_module(module)}"
    return {
        f"{prefix}.lora_A.weight": np.ascontiguousarray(checkpoint.down, dtype=np.float32),
        f"{prefix}.lora_B.weight": np.ascontiguousarray(np.asarray(checkpoint.up, dtype=np.float32).T),
    }


def peft_config(checkpoint: Checkpoint, module: str = DEFAULT_MODULE) -> dict[str, object]:
    """The ``adapter_config.json`` of the adapter: scaling = lora_alpha / sqrt(r) = 1 / sqrt(rank)."""
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "r": checkpoint.config.rank,
        "lora_alpha": 1,
        "use_rslora": True,
        "target_modules": [check_module(module)],
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_dora": False,
    }


def export_peft(
    directory: str | os.PathLike[str], checkpoint: Checkpoint, *, module: str = DEFAULT_MODULE, mode: int = 0o600
) -> PeftExport:
    """Write ``checkpoint``'s adapter into ``directory`` (created if missing) as a PEFT LoRA adapter.

    Each file is replaced atomically, with permissions ``mode`` (the learned weights are as
    private as the engine's); nothing is written if an argument is wrong.
    """
    check_module(module)
    if not np.isfinite(checkpoint.up).all() or not np.isfinite(checkpoint.down).all():
        raise CheckpointError("adapter: expected finite weights, got a non-finite value; nothing exported")
    out = os.fspath(directory)
    if os.path.exists(out) and not os.path.isdir(out):
        raise InvalidInputError(f"peft: expected a directory, {out!r} is a file")
    cfg = checkpoint.config
    metadata = {
        "format": "pt",
        "sona_shm.scaling": repr(1.0 / math.sqrt(cfg.rank)),
        "sona_shm.generation": str(checkpoint.generation),
        "sona_shm.trajectories_processed": str(checkpoint.counters["trajectories_processed"]),
        "sona_shm.hidden_dim": str(cfg.hidden_dim),
    }
    weights = os.path.join(out, ADAPTER_FILE)
    config = os.path.join(out, CONFIG_FILE)
    try:
        os.makedirs(out, exist_ok=True)
        write_atomic(weights, encode(peft_tensors(checkpoint, module), metadata), mode)
        write_atomic(config, (json.dumps(peft_config(checkpoint, module), indent=2) + "\n").encode(), mode)
        files: tuple[str, ...] = (weights, config)
        if checkpoint.routes is not None:
            routes = os.path.join(out, ROUTES_FILE)
            write_atomic(routes, routes_npz(checkpoint), mode)
            files += (routes,)
    except OSError as exc:
        raise CheckpointError(f"peft: cannot write into {out!r} ({exc.strerror or exc})") from None
    return PeftExport(out, module, cfg.rank, cfg.hidden_dim, checkpoint.generation, checkpoint.counters["trajectories_processed"], files)


def routes_npz(checkpoint: Checkpoint) -> bytes:
    """The bytes of ``routes.npz`` for a checkpoint with a route table (the module docstring says what it holds)."""
    table = checkpoint.routes
    assert table is not None
    out = io.BytesIO()
    np.savez(
        out,
        vectors=checkpoint.arrays["route_vectors"].astype(np.float32),
        bias=checkpoint.arrays["route_bias"].astype(np.float32),
        names=np.array(table.names),
        retired=np.array(table.retired_flags(), dtype=bool),
        given=table.vectors,
        temperature=np.float64(checkpoint.config.temperature),
        beta=np.float64(BETA),
    )
    return out.getvalue()


def export_engine(name: str, directory: str | os.PathLike[str], *, module: str = DEFAULT_MODULE) -> PeftExport:
    """Export live engine ``name``'s committed adapter to ``directory`` (see :func:`export_peft`)."""
    check_module(module)
    checkpoint, mode = engine_checkpoint(name)
    return export_peft(directory, checkpoint, module=module, mode=mode)  # as private as the segment


def export_checkpoint(path: str, directory: str | os.PathLike[str], *, module: str = DEFAULT_MODULE) -> PeftExport:
    """Export the adapter of the checkpoint file at ``path`` (validated whole first) to ``directory``."""
    check_module(module)
    checkpoint = read_checkpoint(path)
    return export_peft(directory, checkpoint, module=module, mode=stat.S_IMODE(os.stat(path).st_mode))  # as private as the file


__all__ = [
    "DEFAULT_MODULE",
    "ROUTES_FILE",
    "routes_npz",
    "PeftExport",
    "export_checkpoint",
    "export_engine",
    "export_peft",
    "peft_config",
    "peft_tensors",
]
