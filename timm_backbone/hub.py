"""Finding files in local folders and hub repos (cache first when offline), and reading weight files safely."""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .file_safety import check_bin_storage, folder_lock, read_safetensors, safetensors_shapes, target_mode

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "pytorch_model.bin"
WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
WEIGHT_FILE_NAMES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
# one random id per save_pretrained, written in config.json and in the safetensors metadata: a folder whose two ids
# differ holds files of two different saves
SAVE_ID_KEY = "_weights_save_id"

_TRUE = {"1", "true", "yes", "on"}


def is_offline(local_files_only: bool = False) -> bool:
    """True when only local files may be used: ``local_files_only`` or ``HF_HUB_OFFLINE`` set now."""
    from huggingface_hub import constants

    return bool(local_files_only or constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE)


_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def looks_like_repo_id(src: str) -> bool:
    """``name`` or ``org/name`` with the hub's characters; never ``.``/``..`` or anything that walks a path."""
    parts = src.split("/")
    return len(parts) in (1, 2) and all(_REPO_PART.fullmatch(p) for p in parts) and ".." not in src


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


# hub keyword arguments -------------------------------------------------------------------------------------------
HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "subfolder")


def pop_hub_kwargs(kwargs: dict) -> dict:
    """Split the hub arguments (revision, cache_dir, token, local_files_only, subfolder) out of ``kwargs``."""
    hub = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
    if "use_auth_token" in kwargs:
        hub.setdefault("token", kwargs.pop("use_auth_token"))
    kwargs.pop("force_download", None)
    kwargs.pop("trust_remote_code", None)  # never honoured: no code is run from checkpoints
    return hub


# timm names --------------------------------------------------------------------------------------------------------
def split_timm_name(name: str) -> tuple[str, str | None]:
    """``resnet50.a1_in1k`` -> (``resnet50``, ``a1_in1k``)."""
    arch, _, tag = name.partition(".")
    return arch, tag or None


def check_timm_name(name: str) -> None:
    """Raise ``ValueError`` with close matches when ``name`` (with or without tag) is not a timm architecture."""
    import timm

    arch, _ = split_timm_name(name)
    if timm.is_model(arch):
        return
    close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else "; see timm.list_models() for the names"
    raise ValueError(f"unknown timm model {name!r}{hint}")


def timm_weights_repo(name: str) -> str:
    """The hub repo holding timm's pretrained weights for ``name`` (``resnet50.a1_in1k`` -> ``timm/resnet50.a1_in1k``;
    a name without tag means timm's default tag).

    Raises:
        ValueError: an unknown tag (the valid tags are listed), or no pretrained weights registered.
        OSError: timm's weights for it are a URL, not a hub repo.
    """
    import timm

    try:
        pretrained_cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError as err:  # an unknown tag
        arch, _ = split_timm_name(name)
        tags = ", ".join(timm.list_pretrained(f"{arch}.*")) or "none"
        raise ValueError(f"timm has no pretrained weights {name!r}; valid names with tags: {tags}") from err
    if pretrained_cfg is None:
        raise ValueError(f"timm has no pretrained weights registered for {name!r}")
    if not pretrained_cfg.hf_hub_id:
        raise OSError(
            f"timm's weights for {name!r} are not on the hub (url: {pretrained_cfg.url}); download them and pass "
            f"the file to from_pretrained with the config (or backbone=) naming the architecture"
        )
    return pretrained_cfg.hf_hub_id


# sources -----------------------------------------------------------------------------------------------------------
@dataclass
class Source:
    """What a name passed to ``from_pretrained`` points to, found by :func:`resolve_source`.

    Attributes:
        name: The name as given.
        kind: ``"file"`` (one file), ``"folder"``, ``"hub"`` (a hub repo, found online or in the cache) or ``"timm"``
            (a timm model name with or without tag, or ``hf-hub:org/name``).
        hub_kwargs: ``revision`` (pinned to a commit once found), ``cache_dir``, ``token``, ``local_files_only``,
            ``subfolder``.
    """

    name: str
    kind: str
    hub_kwargs: dict[str, Any] = field(default_factory=dict)
    _json: dict[str, dict[str, Any] | None] = field(default_factory=dict, repr=False)

    @property
    def is_repo(self) -> bool:
        """A folder or hub repo: something that holds named files."""
        return self.kind in ("folder", "hub")

    def resolve(self, filename: str) -> Path | None:
        """The local path of ``filename`` in this folder or hub repo, ``None`` when it has none."""
        if not self.is_repo:
            return None
        return resolve_file(self.name, filename, **self.hub_kwargs)

    def read_json(self, filename: str) -> dict[str, Any] | None:
        """``filename`` parsed (and remembered), ``None`` when the source has no such file."""
        if filename not in self._json:
            path = self.resolve(filename)
            self._json[filename] = read_json(path) if path is not None else None
        return self._json[filename]

    def config_dict(self) -> dict[str, Any]:
        """The source's ``config.json``: of a folder or hub repo, a ``.json`` file, or a timm name's (its
        ``architecture``; for ``hf-hub:org/name`` the repo's own file).

        Raises:
            OSError: a folder or repo without ``config.json``, or a file that is not JSON.
        """
        if self.kind == "timm":
            if self.name.startswith("hf-hub:"):
                return self.weights_source().config_dict()
            return {"architecture": self.name}
        if self.kind == "file":
            return read_json(self.name)
        config = self.read_json(CONFIG_NAME)
        if config is None:
            raise OSError(f"{self.describe()} has no {CONFIG_NAME}{self.offline_note()}")
        return config

    def weights_source(self) -> Source:
        """Where the weights are: the source itself, or for a timm name the hub repo of its pretrained weights."""
        if self.kind != "timm":
            return self
        repo = self.name[len("hf-hub:") :] if self.name.startswith("hf-hub:") else timm_weights_repo(self.name)
        try:
            return resolve_source(repo, hub_repo_only=True, **self.hub_kwargs)
        except OSError as err:
            raise OSError(
                f"the pretrained weights of timm model {self.name!r} are in hub repo {repo!r}: {err}"
            ) from err

    def weights_file(self) -> Path:
        """The first weight file found (safetensors, its index, ``pytorch_model.bin``, its index), or the file.

        Raises:
            OSError: the source holds none of them.
        """
        source = self.weights_source()
        if source.kind == "file":
            return Path(source.name)
        for filename in WEIGHT_FILE_NAMES:
            path = source.resolve(filename)
            if path is not None:
                return path
        of = f" (the weights of timm model {self.name!r})" if source is not self else ""
        raise OSError(f"{source.describe()}{of} has none of the weight files {list(WEIGHT_FILE_NAMES)}"
                      f"{source.offline_note()}")  # fmt: skip

    def load_state_dict(self, max_bytes: int | None = None) -> tuple[dict[str, torch.Tensor], str]:
        """The source's weights and the path they were read from.

        Args:
            max_bytes: Refuse a ``.bin`` declaring more tensor storage than this (see :func:`load_weights`).

        Raises:
            OSError: the weights cannot be read, or the folder's ``model.safetensors`` and ``config.json`` come from
                two different saves.
        """
        path = self.weights_file()
        source = self.weights_source()
        if source is self and self.is_repo and path.name == SAFE_WEIGHTS_NAME:
            state_dict, metadata = read_safetensors(path)
            self.check_pair(path, metadata)
            return state_dict, str(path)
        src = source.name if source.is_repo else None
        return load_weights(path, src=src, max_bytes=max_bytes, **source.hub_kwargs), str(path)

    def check_pair(self, weights_path: Path, metadata: dict[str, str] | None) -> None:
        """Raise ``OSError`` when the weights' save id is not the one ``config.json`` records (both written by
        ``save_pretrained``); a file without an id (written by another tool) is not checked."""
        config = self.read_json(CONFIG_NAME) or {}
        expected = config.get(SAVE_ID_KEY)
        found = (metadata or {}).get(SAVE_ID_KEY)
        if expected is not None and found is not None and found != expected:
            raise OSError(
                f"{weights_path} and the {CONFIG_NAME} beside it come from two different saves (save ids "
                f"{found!r} and {expected!r}): the folder holds a mixed pair, left by an interrupted or concurrent "
                f"save_pretrained; save the model into it again"
            )

    def weights_summary(self) -> tuple[str, int, int] | None:
        """``(path, number of tensors, number of elements)`` of safetensors weights, read from their headers only;
        ``None`` for other formats or a source without weights."""
        try:
            path = self.weights_file()
        except (OSError, ValueError):
            return None
        source = self.weights_source()
        if path.suffix == ".safetensors":
            files = [path]
        elif path.name == SAFE_WEIGHTS_INDEX_NAME:
            src = source.name if source.is_repo else path.parent
            files = [resolve_file(src, shard, **source.hub_kwargs) for shard in shard_names(path, read_json(path))]
            if any(f is None for f in files):
                return None
        else:
            return None
        count = elements = 0
        for file in files:
            for shape in safetensors_shapes(file).values():
                count += 1
                elements += math.prod(shape)
        return str(path), count, elements

    def config_path(self) -> str:
        """Where the config was read from, for messages: the ``config.json`` path, or the timm name."""
        if self.kind == "file":
            return self.name
        if self.kind == "timm":
            if self.name.startswith("hf-hub:"):
                return self.weights_source().config_path()
            return f"timm model {self.name!r}"
        path = self.resolve(CONFIG_NAME)
        return os.fspath(path) if path is not None else self.describe()

    def offline_note(self) -> str:
        """For messages about a missing file: offline, a cached repo may simply lack files never downloaded."""
        if self.kind == "hub" and is_offline(self.hub_kwargs.get("local_files_only", False)):
            return " in the local hub cache (hub access is off: files never downloaded are not there)"
        return ""

    def describe(self) -> str:
        where = {"folder": "local folder", "hub": "hub repo", "timm": "timm model", "file": "file"}[self.kind]
        revision = self.hub_kwargs.get("revision")
        return f"{where} {self.name!r}" + (f" at revision {revision!r}" if revision and self.kind == "hub" else "")


def resolve_source(src: str | os.PathLike, *, hub_repo_only: bool = False, **hub_kwargs: Any) -> Source:
    """Decide what ``src`` is, in order: a file, a local folder, a timm name (``resnet50``, ``resnet50.a1_in1k``,
    ``hf-hub:org/name``), a hub repo id (looked up online, or only in the cache with ``HF_HUB_OFFLINE`` /
    ``local_files_only``). Every ``from_pretrained`` of the package starts here.

    Args:
        src: What the user passed.
        hub_repo_only: Take ``src`` as a hub repo id only (no file, folder or timm name).
        **hub_kwargs: ``revision``, ``cache_dir``, ``token``, ``local_files_only``, ``subfolder``.

    Raises:
        OSError: none of them; the message lists what was tried and why each failed.
    """
    name = os.fspath(src)
    tried = []
    if not hub_repo_only:
        if name.startswith("hf-hub:"):  # always a hub id, even where a folder of that name exists
            repo = name[len("hf-hub:") :]
            if not looks_like_repo_id(repo) or "/" not in repo:
                raise OSError(f"{name!r} does not name a hub repo: 'hf-hub:' takes an id of the form 'org/name'")
            return Source(name, "timm", hub_kwargs)
        if os.path.isfile(name):
            return Source(name, "file", hub_kwargs)
        if os.path.isdir(name):
            return Source(name, "folder", hub_kwargs)
        tried.append(f"a local folder: {os.path.abspath(name)} does not exist")
        if "/" not in name:  # timm names never contain '/'; hub ids are 'org/name'
            try:
                check_timm_name(name)
                return Source(name, "timm", hub_kwargs)
            except ValueError as err:
                tried.append(f"a timm model name: {err}")
            # a bare word that is not a timm name is not looked up on the hub (ids are 'org/name'): the close
            # matches above come back at once instead of after network retries
            tried.append("a hub repo: not looked up, hub ids have the form 'org/name'")
            raise OSError(f"cannot find {name!r}; tried it as\n  - " + "\n  - ".join(tried))
    if not looks_like_repo_id(name):
        tried.append("a hub repo: it is not an id of the form 'org/name'")
    else:
        try:
            path = resolve_file(name, CONFIG_NAME, **hub_kwargs)  # raises when neither cached nor reachable
        except OSError as err:
            tried.append(f"a hub repo: {err}")
        else:
            commit = _snapshot_commit(path)
            if commit is not None:  # later files come from the same commit, even if the branch moves meanwhile
                hub_kwargs = {**hub_kwargs, "revision": commit}
            return Source(name, "hub", hub_kwargs)
    if hub_repo_only:
        raise OSError(tried[-1].removeprefix("a hub repo: "))
    raise OSError(f"cannot find {name!r}; tried it as\n  - " + "\n  - ".join(tried))


def _snapshot_commit(path: Path | None) -> str | None:
    """The commit of a hub cache path ``.../snapshots/<commit>/...``, if it is one."""
    parts = path.parts if path is not None else ()
    if "snapshots" in parts[:-1]:
        commit = parts[parts.index("snapshots") + 1]
        if len(commit) == 40 and all(c in "0123456789abcdef" for c in commit):
            return commit
    return None


def read_json(path: str | os.PathLike) -> dict:
    """A JSON file holding an object.

    Raises:
        OSError: naming the file, when it cannot be read, is not UTF-8 JSON (nesting too deep and integers too long
            for Python included), or holds something other than an object.
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError as err:
        raise OSError(f"{path} is not valid JSON: it is not UTF-8 text ({err.reason} at byte {err.start})") from err
    except RecursionError:
        raise OSError(f"{path} is not valid JSON for this reader: it is nested too deeply") from None
    except ValueError as err:  # JSONDecodeError, and integers longer than Python converts
        raise OSError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise OSError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def shard_names(path: str | os.PathLike, index: dict[str, Any]) -> list[str]:
    """The shard files a checkpoint index names, checked: ``weight_map`` maps tensor names to relative file names
    inside the checkpoint folder.

    Raises:
        OSError: naming the index and the offending entry.
    """
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise OSError(f"{path} has no 'weight_map' object; it is not a sharded checkpoint index")
    for key, shard in weight_map.items():
        if not isinstance(shard, str):
            raise OSError(
                f"{path}: weight_map[{key!r}] must be a shard file name (a string), got {type(shard).__name__}"
            )
        if not shard or os.path.isabs(shard) or ".." in Path(shard).parts or "\\" in shard:
            raise OSError(f"{path} names the shard {shard!r}, which is not a file inside the checkpoint folder")
    return sorted(set(weight_map.values()))


def load_weights(
    path: str | os.PathLike, src: str | os.PathLike | None = None, max_bytes: int | None = None, **hub_kwargs: Any
) -> dict:
    """Read a state dict from safetensors, a ``.bin`` (weights only, never arbitrary pickles) or a shard index.

    Args:
        path: The weight file.
        src: Where shards named by an index file are resolved (defaults to the index's folder).
        max_bytes: Refuse a ``.bin`` whose tensor storage is declared larger than this (a zip bomb), before any
            of it is read; ``None`` checks only that storage is not compressed.
        **hub_kwargs: Passed to :func:`resolve_file` for shards.

    Raises:
        OSError: the file is missing, corrupt, needs code to unpickle, or declares more storage than ``max_bytes``.
    """
    path = Path(path)
    if path.name.endswith(".index.json"):
        index = read_json(path)
        state_dict: dict[str, torch.Tensor] = {}
        for shard in shard_names(path, index):
            shard_path = resolve_file(src if src is not None else path.parent, shard, **hub_kwargs)
            if shard_path is None:
                raise OSError(f"shard {shard!r} named in {path} was not found")
            state_dict.update(load_weights(shard_path, max_bytes=max_bytes))
        return state_dict
    if path.suffix == ".safetensors":
        return read_safetensors(path)[0]
    check_bin_storage(path, max_bytes)
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        # torch's message advises retrying with weights_only=False: the wrong advice for an untrusted file
        reason = "; ".join(
            line.strip()
            for line in str(err).splitlines()
            if line.strip() and "weights_only" not in line and "Weights only load failed" not in line
        )
        raise OSError(
            f"could not read {path} as plain tensors with torch.load(weights_only=True) ({type(err).__name__}: "
            f"{reason}); files that need arbitrary code to unpickle are refused"
        ) from None
    if isinstance(state_dict, dict):
        state_dict = unwrap_state_dict(state_dict)
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise OSError(f"{path} does not hold a state dict of tensors")
    return state_dict


def unwrap_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The tensors inside a checkpoint container: ``{"state_dict": ...}``, ``{"model": ...}``, ``{"module": ...}``
    (training scripts' wrappers), with the ``module.`` prefix that ``DistributedDataParallel`` adds removed."""
    for key in ("state_dict", "model", "module"):
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
    if state_dict and all(isinstance(k, str) and k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Write to a temporary file beside ``path`` and move it into place only when the block finishes cleanly; the
    file gets the permissions of the one it replaces, or those the umask gives a new file."""
    path = Path(path)
    with folder_lock(path.parent):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.chmod(tmp, target_mode(path))
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
    """Write several files of one folder as one save, under the folder's lock: every file is written and synced
    beside its target before any is moved into place, so a failure while writing (a full disk, a crash) leaves all
    the previous files as they were, and concurrent saves into the folder follow one another."""
    folders = {path.parent for path in files}
    if len(folders) != 1:
        raise ValueError(f"atomic_write_files writes files of one folder, got {sorted(map(str, folders))}")
    with folder_lock(folders.pop()):
        _write_staged(files)


def _write_staged(files: dict[Path, bytes]) -> None:
    staged: list[tuple[str, Path]] = []
    try:
        for path, data in files.items():
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            staged.append((tmp, path))
            os.chmod(tmp, target_mode(path))
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
