"""Atomic, resumable checkpoints.

Layout of a run directory::

    OUT/checkpoints/step_00000400/   model.safetensors + config.json   (HF: from_pretrained works)
                                     optimizer.pt                       (full AdamW state)
                                     trainer_state.json                 (step, data position, schedule, run config)
                                     rng.pt                             (per-rank torch / CUDA / python RNG)
                                     tokenizer.json, tokenizer_meta.json
    OUT/checkpoints/latest           text file naming the newest complete checkpoint

A checkpoint is written into ``.tmp-step_…``, every file fsynced, then renamed into place;
only after that is ``latest`` replaced (write temp file, fsync, ``os.replace``). A crash at
any point therefore leaves ``latest`` pointing at a complete checkpoint, and every
``step_*`` folder is complete: without ``latest`` (deleted, or a copied run) the newest one is used.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "capture_rng", "find_checkpoint", "list_checkpoints", "load_training_state",
           "read_trainer_state", "removing_new_files_on_failure", "restore_rng", "save_checkpoint",
           "write_text_atomic"]

LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or incompatible; the CLI prints it as one line."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a crash leaves the old or the new file, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def capture_rng() -> dict[str, Any]:
    """This process's RNG states (torch CPU, CUDA, python ``random``)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _py_state_to_list(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_py_state_from_list(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py_state_to_list(s):
    return [s[0], list(s[1]), s[2]]


def _py_state_from_list(s):
    return (s[0], tuple(s[1]), s[2])


def save_checkpoint(run_dir: str | Path, step: int, *, model, model_state: dict[str, torch.Tensor],
                    optimizer_state: dict, trainer_state: dict, rng_states: list[dict], tokenizer,
                    keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically (call on the main process only); returns its path.

    ``model`` is the unwrapped ``PreTrainedModel`` (for ``save_pretrained``' config and tied
    weights handling); ``model_state`` its full state dict, gathered from DDP/FSDP.
    """
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    tmp = ckpt_root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars would interleave with training output
    model.save_pretrained(tmp, state_dict=model_state, safe_serialization=True)
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save({"ranks": rng_states}, tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1) + "\n")
    tokenizer.save(tmp)
    # safetensors' writer creates its file with mode 0600; give every file the mode a plain
    # write gets here (umask applied), like the run's other files
    mode = (tmp / "trainer_state.json").stat().st_mode & 0o777
    for p in tmp.rglob("*"):
        if p.is_file():
            p.chmod(mode)
    _fsync_tree(tmp)
    final = ckpt_root / name
    if final.exists():  # re-saving the same step (e.g. interrupted right after a resume)
        trash = ckpt_root / f".old-{name}-{os.getpid()}"
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    write_text_atomic(ckpt_root / LATEST, name + "\n")
    for old in list_checkpoints(run_dir)[:-keep]:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def find_checkpoint(path: str | Path) -> Path:
    """Resolve a run directory (its ``latest``), a ``checkpoints/`` folder or a checkpoint itself.

    >>> find_checkpoint("/nonexistent")
    Traceback (most recent call last):
    ...
    deltanet.training.checkpoint.CheckpointError: checkpoint path not found: /nonexistent
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path not found: {path}")
    for root in (path / "checkpoints", path):
        latest = root / LATEST
        steps = list_checkpoints(root.parent) if root.name == "checkpoints" else []
        if latest.is_file():
            target = root / latest.read_text().strip()
            if target.is_dir():
                return target
            if not steps:
                raise CheckpointError(f"{latest} points to a missing checkpoint {target.name}")
        if steps:  # no (or a dangling) ``latest``: step_* folders only appear complete, take the newest
            return steps[-1]
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    raise CheckpointError(f"no checkpoint in {path} (expected a run directory or a checkpoint with "
                          "model.safetensors and config.json)")


def load_model(ckpt: Path, device: torch.device | str = "cpu"):
    """``DeltaNetForCausalLM.from_pretrained`` with corrupt files reported as CheckpointError."""
    from deltanet.models import DeltaNetForCausalLM

    from transformers.utils import logging as hf_logging

    _check_safetensors(ckpt)
    hf_logging.disable_progress_bar()  # no "Loading weights" bar in front of generated text
    try:
        model = DeltaNetForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    except Exception as e:
        raise CheckpointError(f"cannot load model from {ckpt}: {_one_line(e)}") from None
    return model.to(device)


def _check_safetensors(ckpt: Path) -> None:
    from safetensors import safe_open

    path = ckpt / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{ckpt} has no model.safetensors")
    try:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                f.get_slice(k)  # header + offsets must be consistent
    except Exception as e:
        raise CheckpointError(f"corrupt checkpoint {path}: {_one_line(e)}") from None
    try:
        json.loads((ckpt / "config.json").read_text())
    except Exception as e:
        raise CheckpointError(f"corrupt checkpoint {ckpt / 'config.json'}: {_one_line(e)}") from None


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    """``trainer_state.json`` of a checkpoint (step, elapsed time, threads, ...)."""
    try:
        return json.loads((ckpt / "trainer_state.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"incomplete checkpoint {ckpt}: missing trainer_state.json") from None
    except ValueError as e:
        raise CheckpointError(f"corrupt checkpoint {ckpt / 'trainer_state.json'}: {_one_line(e)}") from None


def load_training_state(ckpt: Path) -> dict[str, Any]:
    """Optimizer state, trainer state and RNG states of a checkpoint (not the weights)."""
    try:
        trainer_state = json.loads((ckpt / "trainer_state.json").read_text())
        optimizer_state = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
        rng = torch.load(ckpt / "rng.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"incomplete checkpoint {ckpt}: missing {Path(e.filename).name}") from None
    except Exception as e:
        raise CheckpointError(f"corrupt checkpoint {ckpt}: {_one_line(e)}") from None
    return {"trainer": trainer_state, "optimizer": optimizer_state, "rng": rng["ranks"]}


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


@contextlib.contextmanager
def removing_new_files_on_failure(run_dir: Path, enabled: bool = True):
    """Create ``run_dir``; if the block raises, remove what was not there before.

    A run that fails before it starts (missing or unusable data, ...) must not leave a
    half-made run folder behind: it would clutter the working directory and block the next
    attempt with the same ``--out``. Parents created for it (``runs/``) go too.
    """
    if not enabled:
        yield
        return
    top = run_dir
    while not top.parent.exists():
        top = top.parent
    existed = run_dir.exists()
    before = set(os.listdir(run_dir)) if existed else set()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        if not existed:
            shutil.rmtree(top, ignore_errors=True)
        else:
            for name in set(os.listdir(run_dir)) - before:
                p = run_dir / name
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        raise
