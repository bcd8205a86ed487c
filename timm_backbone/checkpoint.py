"""Training run files: checkpoint folders replaced whole (a crash leaves the previous folder or the new one), the
training state read back as plain tensors and containers only, and the JSON-lines log."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .hub import atomic_write

STATE_NAME = "training_state.pt"
STATE_KEYS = ("step", "epoch", "batches_done", "best_metric", "best_step", "elapsed", "optimizer", "seed")
# config fields that describe the file, not the model
_VOLATILE = {"architectures", "name_or_path", "_name_or_path", "transformers_version", "torch_dtype", "dtype"}


def _old(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.old")


def replace_folder(folder: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Fill a new temporary folder beside ``folder`` with ``write(tmp)``, then put it in ``folder``'s place.

    The old folder is moved aside before the new one is renamed in and deleted after, so at any moment one complete
    folder exists (after a crash between the two renames, :func:`recover_folder` moves the old one back).
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = _old(folder)
    if old.exists():
        shutil.rmtree(old)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def recover_folder(folder: str | os.PathLike) -> None:
    """Undo a :func:`replace_folder` interrupted between its renames: bring the old folder back if the new is absent."""
    folder = Path(folder)
    old = _old(folder)
    if old.is_dir() and not folder.exists():
        old.rename(folder)


def save_checkpoint(
    folder: str | os.PathLike,
    model: Any,
    processor: Any,
    training_state: dict[str, Any] | None = None,
    extra_files: dict[str, str] | None = None,
) -> None:
    """Replace ``folder`` with ``model.save_pretrained`` + ``processor.save_pretrained`` (+ the training state, +
    small text files)."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if training_state is not None:
            torch.save(training_state, tmp / STATE_NAME)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")

    replace_folder(folder, write)


def load_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training state with ``torch.load(weights_only=True)``: tensors and plain containers only.

    Raises:
        OSError: the file is missing, holds other objects, or lacks the fields of a training state.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise OSError(f"{path} is missing") from err
    except Exception as err:
        raise OSError(
            f"could not read the training state {path} as plain tensors with torch.load(weights_only=True) "
            f"({type(err).__name__}: {err})"
        ) from err
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise OSError(f"{path} is not a training state of timm-backbone train (missing {missing})")
    return state


def config_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """The fields in which two config dicts differ, as ``"name: saved vs current"`` (nested dicts by dotted name)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if key in _VOLATILE:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} vs {b!r}")
    return out


class JsonLog:
    """``log.jsonl``: one JSON object per line, appended and flushed as it is written."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Drop the records of steps after ``step`` (those a resumed run repeats); ``-1`` empties the log."""
        kept = [r for r in self.records() if step >= 0 and r.get("step", 0) <= step]
        with atomic_write(self.path, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in kept))
