"""Reading weight files without trusting them, and the file-system side of saving: permissions and folder locks."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """The tensors and the metadata of a safetensors file, read through one open file.

    Raises:
        OSError: the file is truncated or corrupt.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    except (SafetensorError, OSError, ValueError) as err:
        raise OSError(f"could not read {path}: the safetensors file is truncated or corrupt ({err})") from err


def safetensors_shapes(path: str | os.PathLike) -> dict[str, list[int]]:
    """Every tensor's shape in a safetensors file, from its header (no tensor is read).

    Raises:
        OSError: the file is truncated or corrupt.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            return {k: f.get_slice(k).get_shape() for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise OSError(f"could not read {path}: the safetensors file is truncated or corrupt ({err})") from err


def check_bin_storage(path: str | os.PathLike, max_bytes: int | None = None) -> None:
    """Refuse a ``torch.save`` archive whose tensor storage records are compressed (``torch.save`` stores them
    uncompressed: a compressed record is a zip bomb) or declared larger in total than ``max_bytes``, reading only the
    zip directory. Files that are not zip archives (legacy ``torch.save``) are left to ``torch.load``.

    Raises:
        OSError: naming the file, the declared size and the limit.
    """
    import zipfile

    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            records = [i for i in archive.infolist() if "/data/" in i.filename]
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise OSError(f"could not read {path}: the archive is corrupt ({err})") from err
    for info in records:
        if info.compress_type != zipfile.ZIP_STORED and info.file_size > 2**20:
            raise OSError(
                f"{path} holds a compressed tensor record {info.filename!r} declaring {info.file_size} bytes; "
                f"torch.save never compresses tensors, so the file is refused unread"
            )
    declared = sum(i.file_size for i in records)
    if max_bytes is not None and declared > max_bytes:
        raise OSError(
            f"{path} declares {declared} bytes of tensors, more than the {max_bytes} bytes the model can hold "
            f"(with optimizer state); the file does not belong to this model and is refused unread"
        )


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows (``os.umask`` sets it process-wide, so
    setting it back briefly exposes threads creating files meanwhile)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def target_mode(path: Path) -> int:
    """The permissions a file written to ``path`` gets: those of the file it replaces, else what ``open(path, "w")``
    gives under the current umask (``mkstemp`` alone would make it 0600, unreadable for other users)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~current_umask()


@contextmanager
def folder_lock(folder: str | os.PathLike, shared: bool = False) -> Iterator[None]:
    """Hold an advisory lock on ``folder`` (``flock`` on the folder itself, so no lock file is left behind): savers
    take it exclusively, readers shared, so that a reader never sees half of a concurrent save. Where ``flock`` is
    unavailable (Windows, folders that cannot be opened) nothing is locked."""
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        except OSError:  # file systems without flock support
            pass
        yield
    finally:
        os.close(fd)  # releases the lock
