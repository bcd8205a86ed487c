"""Build a Hugging Face hub cache on disk from a local folder, so hub ids resolve offline in tests.

The layout is the one ``huggingface_hub`` writes when it downloads a repo::

    <cache_dir>/models--<org>--<name>/
        refs/<revision>                  text file holding the commit hash ("main", a tag, ...)
        snapshots/<commit>/<files...>    one entry per file (a relative symlink into blobs/, or a copy)
        blobs/<sha256>                   the file contents (only with ``use_blobs=True``)
        .no_exist/<commit>/<file>        empty markers: files known to be absent from the repo

Usage in a test (no network; ``tests/conftest.py`` sets ``HF_HUB_OFFLINE=1``)::

    from hub_cache import make_hub_cache, use_hub_cache

    model.save_pretrained(tmp_path / "src")                     # config.json + model.safetensors
    cache = tmp_path / "hub"
    commit = make_hub_cache(cache, "microsoft/swin-tiny", tmp_path / "src")
    AutoBackbone.from_pretrained("microsoft/swin-tiny", cache_dir=cache)      # explicit cache_dir
    AutoBackbone.from_pretrained("microsoft/swin-tiny", revision=commit, cache_dir=cache)

    use_hub_cache(monkeypatch, cache)                            # make it THE default cache for this test
    AutoBackbone.from_pretrained("microsoft/swin-tiny")          # word for word, as a user would type it

``tests/`` is on ``sys.path`` under pytest's default ``rootdir`` import mode, so ``from hub_cache import ...`` works
from any test file.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def _folder_commit(folder: Path) -> str:
    """A deterministic 40-hex "commit hash" of the folder's relative paths and contents."""
    digest = hashlib.sha1()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def make_hub_cache(
    cache_dir: str | os.PathLike,
    repo_id: str,
    folder: str | os.PathLike,
    revision: str = "main",
    *,
    commit: str | None = None,
    tags: Iterable[str] = (),
    use_blobs: bool = True,
    missing: Iterable[str] = (),
) -> str:
    """Lay out ``folder``'s files as the cached snapshot of hub repo ``repo_id`` and return the commit hash.

    Calling it again for the same repo with another folder (and another ``revision`` or ``commit``) adds a second
    snapshot beside the first, as the hub cache does after downloading two revisions.

    Args:
        cache_dir: Root of the cache (what ``cache_dir=`` / ``HF_HUB_CACHE`` point to); created if needed.
        repo_id: ``"org/name"`` (or a legacy single-part name).
        folder: A local folder whose files (recursively) become the snapshot, e.g. from ``save_pretrained``.
        revision: The ref that points at the snapshot (``"main"``, a branch or a tag). When it is itself a 40-hex
            commit hash, no ref file is written and the snapshot is stored under that hash.
        commit: The commit hash to store the snapshot under; default a SHA-1 of the folder's contents.
        tags: Further refs (tags or branches) that point at the same commit.
        use_blobs: Store contents in ``blobs/`` and make snapshot entries relative symlinks to them, as
            ``huggingface_hub`` does; ``False`` (or a file system without symlinks) copies the files instead.
        missing: File names to record as known-absent in ``.no_exist/<commit>/`` (what the hub cache writes after
            a 404), so lookups of them answer "not in this repo" rather than "not cached".

    Returns:
        The commit hash of the snapshot (usable as ``revision=``).

    Raises:
        ValueError: ``repo_id`` is not of the form ``org/name``, or ``commit`` is not 40 hex digits.
        FileNotFoundError: ``folder`` is not a directory.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder to build a hub cache from")
    parts = repo_id.split("/")
    if len(parts) not in (1, 2) or not all(parts):
        raise ValueError(f"repo_id must look like 'org/name', got {repo_id!r}")
    if _COMMIT.match(revision) and commit is None:
        commit = revision
    commit = commit or _folder_commit(folder)
    if not _COMMIT.match(commit):
        raise ValueError(f"commit must be 40 lowercase hex digits, got {commit!r}")

    repo_dir = Path(cache_dir, "models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for ref in ([] if _COMMIT.match(revision) else [revision]) + list(tags):
        ref_file = repo_dir / "refs" / ref
        ref_file.parent.mkdir(parents=True, exist_ok=True)
        ref_file.write_text(commit)  # no trailing newline, like huggingface_hub

    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        target = snapshot / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            target.unlink()
        if use_blobs:
            blob = repo_dir / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            if not blob.exists():
                shutil.copyfile(path, blob)
            try:
                target.symlink_to(os.path.relpath(blob, target.parent))
                continue
            except OSError:  # no symlinks here (e.g. Windows without developer mode): copy, as the hub does
                pass
        shutil.copyfile(path, target)

    for name in missing:
        marker = repo_dir / ".no_exist" / commit / name
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    return commit


def use_hub_cache(monkeypatch, cache_dir: str | os.PathLike) -> Path:
    """Make ``cache_dir`` the default hub cache for the rest of one test, offline.

    ``huggingface_hub`` reads ``HF_HUB_CACHE`` once at import, so the environment variable alone is not enough:
    the module constant is patched too. ``monkeypatch`` (pytest's fixture) undoes both after the test.

    Returns:
        ``cache_dir`` as a ``Path``.
    """
    from huggingface_hub import constants

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HUB_CACHE", os.fspath(cache_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", os.fspath(cache_dir))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache_dir
