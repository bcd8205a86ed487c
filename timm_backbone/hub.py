"""Finding files in local folders and hub repos (cache first when offline), and reading weight files safely."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "pytorch_model.bin"
WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
WEIGHT_FILE_NAMES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)

_TRUE = {"1", "true", "yes", "on"}


def is_offline(local_files_only: bool = False) -> bool:
    """True when only local files may be used: ``local_files_only`` or ``HF_HUB_OFFLINE`` set now."""
    from huggingface_hub import constants

    return bool(local_files_only or constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE)


def looks_like_repo_id(src: str) -> bool:
    parts = src.split("/")
    return len(parts) in (1, 2) and all(parts) and not src.startswith((".", "~")) and "\\" not in src


def resolve_file(
    src: str | os.PathLike,
    filename: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    subfolder: str = "",
) -> Path | None:
    """Return the local path of ``filename`` in a folder or hub repo, or ``None`` when the source lacks it.

    A folder is read as it is. A hub id is looked up in the local cache when offline (``HF_HUB_OFFLINE`` or
    ``local_files_only``), and downloaded (or revalidated) otherwise.

    Raises:
        OSError: the source is neither a folder nor a reachable (or cached) hub repo.
    """
    src = os.fspath(src)
    relative = f"{subfolder}/{filename}" if subfolder else filename
    if os.path.isdir(src):
        path = Path(src, relative)
        return path if path.is_file() else None
    if not looks_like_repo_id(src):
        raise OSError(f"{src!r} is not a local folder, and not a hub repo id of the form 'org/name'")

    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = is_offline(local_files_only)
    if offline:
        cached = try_to_load_from_cache(src, relative, cache_dir=cache_dir, revision=revision)
        if isinstance(cached, str):
            return Path(cached)
        if cached is not None or _cached_snapshot(src, revision, cache_dir) is not None:
            return None  # the repo is cached and this file is known not to be in it
        raise OSError(
            f"{src!r} is not a local folder and is not in the hub cache ({_cache_root(cache_dir)}), and hub access "
            f"is off (HF_HUB_OFFLINE or local_files_only); download it once online or pass a local folder"
        )
    try:
        return Path(hf_hub_download(src, relative, revision=revision, cache_dir=cache_dir, token=token))
    except EntryNotFoundError:
        return None
    except GatedRepoError as err:
        raise OSError(f"{src!r} is a gated repo; pass a token that has access ({err})") from err
    except RepositoryNotFoundError as err:
        raise OSError(
            f"{src!r} is not a local folder and no hub repo of that id was found (or it is private: pass a token)"
        ) from err
    except RevisionNotFoundError as err:
        raise OSError(f"revision {revision!r} does not exist in hub repo {src!r}") from err
    except LocalEntryNotFoundError as err:
        if _cached_snapshot(src, revision, cache_dir) is not None:
            return None
        raise OSError(
            f"{src!r} is not a local folder, the hub could not be reached and it is not in the cache "
            f"({_cache_root(cache_dir)})"
        ) from err


def _cache_root(cache_dir: str | os.PathLike | None) -> str:
    from huggingface_hub import constants

    return os.fspath(cache_dir) if cache_dir is not None else constants.HF_HUB_CACHE


def _cached_snapshot(repo_id: str, revision: str | None, cache_dir: str | os.PathLike | None) -> Path | None:
    """The cached snapshot folder of ``repo_id`` at ``revision`` (a branch, tag or commit), if any."""
    repo_dir = Path(_cache_root(cache_dir), "models--" + repo_id.replace("/", "--"))
    revision = revision or "main"
    ref = repo_dir / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = repo_dir / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def resolve_weights(src: str | os.PathLike, **hub_kwargs: Any) -> Path | None:
    """The first weight file found, in order: safetensors, its shard index, ``pytorch_model.bin``, its index."""
    for name in WEIGHT_FILE_NAMES:
        path = resolve_file(src, name, **hub_kwargs)
        if path is not None:
            return path
    return None


def read_json(path: str | os.PathLike) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise OSError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise OSError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def load_weights(path: str | os.PathLike, src: str | os.PathLike | None = None, **hub_kwargs: Any) -> dict:
    """Read a state dict from safetensors, a ``.bin`` (weights only, never arbitrary pickles) or a shard index.

    Args:
        path: The weight file.
        src: Where shards named by an index file are resolved (defaults to the index's folder).
        **hub_kwargs: Passed to :func:`resolve_file` for shards.
    """
    path = Path(path)
    if path.name.endswith(".index.json"):
        index = read_json(path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise OSError(f"{path} has no 'weight_map' object; it is not a sharded checkpoint index")
        state_dict: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if not isinstance(shard, str) or os.path.isabs(shard) or ".." in Path(shard).parts:
                raise OSError(f"{path} names the shard {shard!r}, which is not a file inside the checkpoint folder")
            shard_path = resolve_file(src if src is not None else path.parent, shard, **hub_kwargs)
            if shard_path is None:
                raise OSError(f"shard {shard!r} named in {path} was not found")
            state_dict.update(load_weights(shard_path))
        return state_dict
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(os.fspath(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise OSError(f"could not read {path}: the safetensors file is truncated or corrupt ({err})") from err
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise OSError(
            f"could not read {path} as plain tensors with torch.load(weights_only=True) ({type(err).__name__}: "
            f"{err}); files that need arbitrary code to unpickle are refused"
        ) from err
    for key in ("state_dict", "model", "module"):
        if isinstance(state_dict, dict) and isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise OSError(f"{path} does not hold a state dict of tensors")
    return state_dict


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Write to a temporary file beside ``path`` and move it into place only when the block finishes cleanly."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_files(files: dict[Path, bytes]) -> None:
    """Write several files as one save: every file is written and synced beside its target before any is moved into
    place, so a failure while writing (a full disk, a crash) leaves all the previous files as they were."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, data in files.items():
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            staged.append((tmp, path))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise


def safetensors_bytes(state_dict: dict[str, torch.Tensor], metadata: dict) -> bytes:
    """A state dict serialised in the safetensors format."""
    from safetensors.torch import save

    # clone: safetensors refuses tensors that share storage (tied or sliced weights)
    return save({k: v.detach().cpu().clone().contiguous() for k, v in state_dict.items()}, metadata=metadata)


def save_safetensors_atomic(state_dict: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict) -> None:
    data = safetensors_bytes(state_dict, metadata)
    with atomic_write(path) as f:
        f.write(data)
