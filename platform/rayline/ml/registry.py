"""The model registry: numbered, immutable model versions and movable aliases on a filesystem.

A registry is a directory on the local disk or on any filesystem pyarrow opens (``s3://``,
``gs://``, ``file://``, ...). Nothing is cached in memory: every call reads storage, so several
processes (training jobs, a serving deployment, the CLI) can share one registry.

Layout::

    <root>/<name>/versions/<N>/...            the artifact files of version N
    <root>/<name>/versions/<N>/metadata.json  written last: a version without it is incomplete
    <root>/<name>/versions/<N>/.deleted       tombstone of a deleted version (N is never reused)
    <root>/<name>/aliases/<alias>             the version number the alias points at
    <root>/<name>/alias_history.jsonl         every alias move: alias, from, to, at, by, reason
    <root>/<name>/.staging/<id>/              a registration being written (local filesystem)

Guarantees on the local filesystem: a version appears complete or not at all (it is written to a
staging directory, then renamed into place; the rename fails if the number is taken, so
concurrent registrations get distinct numbers); alias files are replaced atomically; history
lines are appended with ``O_APPEND``.

On other filesystems (object stores have no atomic directory rename), registration is best
effort: the writer claims ``versions/<N>`` with a marker object, backs off if it sees any other
entry there, uploads the files and writes ``metadata.json`` last. Readers still never see a
version without its ``metadata.json``. With a strongly consistent store (S3, GCS) two writers do
not get the same number; the alias history is rewritten whole, so concurrent alias moves may
lose a history line (never an alias).

Example:
    >>> from rayline.ml.registry import ModelRegistry
    >>> reg = ModelRegistry("registry")  # doctest: +SKIP
    >>> mv = reg.register("flights-delay", "out/model", {"metrics": {"auc": 0.83}})  # doctest: +SKIP
    >>> reg.set_alias("flights-delay", "champion", mv.version)  # doctest: +SKIP
    >>> reg.resolve("flights-delay@champion").uri  # doctest: +SKIP
    '/work/registry/flights-delay/versions/1'
"""

from __future__ import annotations

import errno
import getpass
import hashlib
import json
import logging
import os
import random
import re
import shutil
import socket
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path, PurePath
from typing import Any
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from ..runstore import atomic_write_text, now_iso

__all__ = ["ModelRegistry", "ModelVersion", "RegistryError"]

log = logging.getLogger(__name__)

METADATA = "metadata.json"
TOMBSTONE = ".deleted"
RESERVED_FIELDS = ("name", "version", "created_at", "registered_by", "files")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_MAX_ATTEMPTS = 1000


class RegistryError(RuntimeError):
    """A registry operation failed; the message names the model, version, alias or path."""


@dataclass
class ModelVersion:
    """One complete, valid version of a model.

    Attributes:
        name: The model name.
        version: The version number (1, 2, ...).
        uri: The directory holding the version's files (a local path, or a URI for a remote
            registry; see :meth:`ModelRegistry.local_path`).
        metadata: The contents of ``metadata.json``.
        aliases: The aliases pointing at this version, sorted.
    """

    name: str
    version: int
    uri: str
    metadata: dict[str, Any]
    aliases: list[str] = field(default_factory=list)

    @property
    def ref(self) -> str:
        """``NAME@VERSION``, a reference :meth:`ModelRegistry.resolve` accepts."""
        return f"{self.name}@{self.version}"


class _NotAVersion(Exception):
    """Why a version directory is not a valid version (``silent`` for deleted versions)."""

    def __init__(self, reason: str, silent: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.silent = silent


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise RegistryError(
            f"invalid model name {name!r}: use letters, digits, '_', '.' and '-', "
            "starting with a letter or digit"
        )


def _check_alias(alias: str) -> None:
    if (
        not isinstance(alias, str)
        or not _ALIAS_RE.match(alias)
        or alias.isdigit()
        or alias.lower() == "latest"
    ):
        raise RegistryError(
            f"invalid alias {alias!r}: use letters, digits, '_' and '-', starting with a letter "
            "('latest' is reserved)"
        )


def _check_version_number(version: Any) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RegistryError(f"invalid version {version!r}: expected a number >= 1")
    return version


def _version_number(text: str) -> int | None:
    """The version number a directory name stands for, or None for a non-canonical name."""
    return int(text) if text.isdigit() and str(int(text)) == text else None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, (datetime, date)):
        return obj.isoformat()
    tolist = getattr(obj, "tolist", None)  # numpy scalars and arrays
    if callable(tolist):
        return tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=_json_default) + "\n"


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _artifact_files(src: Path) -> list[str]:
    """The files under ``src`` as sorted POSIX paths relative to it."""
    files = []
    for dirpath, _dirnames, filenames in os.walk(src, followlinks=True):
        for f in filenames:
            files.append((Path(dirpath) / f).relative_to(src).as_posix())
    return sorted(files)


class ModelRegistry:
    """Versioned models with aliases under one root directory or URI.

    Args:
        uri: A local path (relative or absolute) or a pyarrow filesystem URI such as
            ``s3://bucket/models`` or ``file:///srv/registry``.

    Raises:
        RegistryError: If the URI cannot be opened.

    Example:
        >>> reg = ModelRegistry("registry")  # doctest: +SKIP
        >>> reg.get("flights-delay", "champion").version  # doctest: +SKIP
        3
    """

    def __init__(self, uri: str | os.PathLike[str]) -> None:
        text = os.fspath(uri)
        if _SCHEME_RE.match(text):
            try:
                fs, root = pafs.FileSystem.from_uri(text)
            except (ValueError, OSError) as e:  # pyarrow.ArrowInvalid is a ValueError
                raise RegistryError(f"cannot open model registry {text!r}: {e}") from e
            self.uri = text.rstrip("/")
        else:
            fs, root = pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())
            self.uri = root
        self._fs: pafs.FileSystem = fs
        self._root = root.rstrip("/") if root != "/" else root
        self._local = isinstance(fs, pafs.LocalFileSystem)
        # Object stores need no directories; a directory marker left by a writer that backed
        # off would show up as an empty version.
        self._object_store = fs.type_name in ("s3", "gcs", "abfs")

    def __repr__(self) -> str:
        return f"ModelRegistry({self.uri!r})"

    # -- paths -----------------------------------------------------------------------------

    def _path(self, *parts: str) -> str:
        if not self._root:
            return "/".join(parts)
        return "/".join([self._root.rstrip("/"), *parts])

    def _version_path(self, name: str, version: int) -> str:
        return self._path(name, "versions", str(version))

    def _alias_path(self, name: str, alias: str) -> str:
        return self._path(name, "aliases", alias)

    def _version_uri(self, name: str, version: int) -> str:
        if self._local:
            return self._version_path(name, version)
        parts = urlsplit(self.uri)  # keep the scheme, host and query (s3://b/p?region=...)
        uri = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}/{name}/versions/{version}"
        return f"{uri}?{parts.query}" if parts.query else uri

    # -- storage primitives ----------------------------------------------------------------

    def _entries(self, path: str, recursive: bool = False) -> list[pafs.FileInfo]:
        sel = pafs.FileSelector(path, allow_not_found=True, recursive=recursive)
        return list(self._fs.get_file_info(sel))

    def _read_text(self, path: str) -> str | None:
        """The file's text, or None if it does not exist."""
        try:
            with self._fs.open_input_stream(path) as f:
                return bytes(f.read()).decode("utf-8")
        except FileNotFoundError:
            return None

    def _write_text(self, path: str, text: str) -> None:
        """Replace a file in one step (a temp file and a rename locally; one object remotely)."""
        if self._local:
            atomic_write_text(Path(path), text)
            return
        self._make_parent(path)
        with self._fs.open_output_stream(path) as f:
            f.write(text.encode("utf-8"))

    def _make_parent(self, path: str) -> None:
        if not self._object_store:
            self._fs.create_dir(path.rsplit("/", 1)[0], recursive=True)

    def _append_line(self, path: str, line: str) -> None:
        if self._local:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:  # O_APPEND: one write per line
                f.write(line)
            return
        self._write_text(path, (self._read_text(path) or "") + line)  # best effort

    def _delete(self, info: pafs.FileInfo) -> None:
        if info.type == pafs.FileType.Directory:
            self._fs.delete_dir(info.path)
        elif info.type != pafs.FileType.NotFound:
            self._fs.delete_file(info.path)

    # -- registering -----------------------------------------------------------------------

    def register(
        self, name: str, artifact_dir: str | os.PathLike[str], metadata: Mapping[str, Any]
    ) -> ModelVersion:
        """Copy a local directory of model files into the registry as the next version.

        The registry adds ``name``, ``version``, ``created_at`` (UTC ISO), ``registered_by`` and
        ``files`` (the copied files, checked on every read) to the metadata and writes
        ``metadata.json`` last. The version becomes visible only once complete; a failed copy
        leaves no version behind.

        Args:
            name: The model name (letters, digits, ``_ . -``).
            artifact_dir: A local directory with the model files (weights, preprocessor.json,
                ...). It must not contain ``metadata.json``.
            metadata: JSON-serialisable fields to store with the version, e.g. ``metrics``,
                ``params``, ``signature`` and lineage (``run_id``, ``dataset``).

        Returns:
            The new version.

        Raises:
            RegistryError: If the name is invalid, the directory is missing, or the metadata
                uses a reserved field or is not JSON-serialisable.
        """
        _check_name(name)
        src = Path(artifact_dir)
        if not src.is_dir():
            raise RegistryError(f"cannot register {name!r}: {src} is not a directory")
        reserved = sorted(set(metadata) & set(RESERVED_FIELDS))
        if reserved:
            raise RegistryError(
                f"cannot register {name!r}: metadata field(s) {', '.join(reserved)} are set by "
                "the registry"
            )
        try:
            user_meta = json.loads(json.dumps(dict(metadata), default=_json_default))
        except (TypeError, ValueError) as e:
            raise RegistryError(f"cannot register {name!r}: metadata is not JSON: {e}") from e
        files = _artifact_files(src)
        if METADATA in files:
            raise RegistryError(
                f"cannot register {name!r}: {src / METADATA} would clash with the registry's "
                "metadata.json; rename it"
            )
        publish = self._publish_local if self._local else self._publish_remote
        version, doc = publish(name, src, files, user_meta)
        log.info("registered %s version %d at %s", name, version, self._version_uri(name, version))
        return ModelVersion(name, version, self._version_uri(name, version), doc, [])

    def _document(
        self, name: str, version: int, user_meta: dict[str, Any], files: list[str]
    ) -> dict[str, Any]:
        return {
            "name": name,
            "version": version,
            "created_at": now_iso(),
            "registered_by": _who(),
            **user_meta,
            "files": files,
        }

    def _next_version(self, name: str) -> int:
        """One more than the highest number in use (deleted and broken versions included)."""
        numbers = [
            _version_number(i.base_name) for i in self._entries(self._path(name, "versions"))
        ]
        return max((n for n in numbers if n is not None), default=0) + 1

    def _publish_local(
        self, name: str, src: Path, files: list[str], user_meta: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        staging = Path(self._path(name, ".staging", uuid.uuid4().hex))
        versions = Path(self._path(name, "versions"))
        try:
            staging.mkdir(parents=True)
            for rel in files:
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src / rel, staging / rel)
            versions.mkdir(parents=True, exist_ok=True)
            for _ in range(_MAX_ATTEMPTS):
                version = self._next_version(name)
                doc = self._document(name, version, user_meta, files)
                (staging / METADATA).write_text(_dumps(doc), encoding="utf-8")
                try:
                    # rename() of a directory fails if the target exists and is not empty, so
                    # exactly one of several concurrent writers gets each number.
                    os.rename(staging, versions / str(version))
                    return version, doc
                except OSError as e:
                    if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                        raise
            raise RegistryError(f"cannot register {name!r}: no free version number in {versions}")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _publish_remote(
        self, name: str, src: Path, files: list[str], user_meta: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        token = uuid.uuid4().hex
        for attempt in range(_MAX_ATTEMPTS):
            version = self._next_version(name)
            vdir = self._version_path(name, version)
            claim = f"{vdir}/.claim-{token}"
            self._write_text(claim, now_iso())
            if any(i.path != claim for i in self._entries(vdir)):
                self._fs.delete_file(claim)  # someone else is here: try a higher number
                time.sleep(random.uniform(0, 0.05 * min(attempt + 1, 20)))
                continue
            try:
                for rel in files:
                    self._make_parent(f"{vdir}/{rel}")
                    with (
                        open(src / rel, "rb") as f,
                        self._fs.open_output_stream(f"{vdir}/{rel}") as o,
                    ):
                        shutil.copyfileobj(f, o, length=8 << 20)
                doc = self._document(name, version, user_meta, files)
                self._write_text(f"{vdir}/{METADATA}", _dumps(doc))
            except BaseException:
                try:
                    self._fs.delete_dir(vdir)
                except OSError:
                    log.warning("could not clean up the failed registration at %s", vdir)
                raise
            self._fs.delete_file(claim)
            return version, doc
        raise RegistryError(f"cannot register {name!r}: no free version number in {self.uri}")

    # -- reading ---------------------------------------------------------------------------

    def list_models(self) -> list[str]:
        """The names of the models in the registry, sorted."""
        return sorted(
            i.base_name
            for i in self._entries(self._root)
            if i.type == pafs.FileType.Directory and _NAME_RE.match(i.base_name)
        )

    def _inspect(self, name: str, version: int) -> dict[str, Any]:
        """The metadata of a valid version; raises _NotAVersion saying why it is not one."""
        vdir = self._version_path(name, version)
        where = f"model {name!r} version {version}"
        dir_info, tomb_info, meta_info = self._fs.get_file_info(
            [vdir, f"{vdir}/{TOMBSTONE}", f"{vdir}/{METADATA}"]
        )
        if dir_info.type == pafs.FileType.NotFound:
            raise _NotAVersion(f"{where} does not exist", silent=True)
        if tomb_info.type != pafs.FileType.NotFound:
            raise _NotAVersion(f"{where} was deleted", silent=True)
        if meta_info.type != pafs.FileType.File:
            raise _NotAVersion(
                f"{where} at {self._version_uri(name, version)} has no {METADATA} "
                "(registration interrupted, failed or still running)"
            )
        try:
            doc = json.loads(self._read_text(meta_info.path) or "")
        except (ValueError, OSError) as e:
            raise _NotAVersion(f"{where}: unreadable {meta_info.path}: {e}") from e
        if not isinstance(doc, dict):
            raise _NotAVersion(f"{where}: {meta_info.path} is not a JSON object")
        if doc.get("name") != name or doc.get("version") != version:
            raise _NotAVersion(
                f"{where}: {meta_info.path} describes {doc.get('name')!r} version "
                f"{doc.get('version')!r}"
            )
        files = doc.get("files")
        if files is not None:
            if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
                raise _NotAVersion(f"{where}: 'files' in {meta_info.path} is not a list of paths")
            bad = [f for f in files if f.startswith("/") or ".." in f.split("/")]
            good = [f for f in files if f not in bad]
            infos = self._fs.get_file_info([f"{vdir}/{f}" for f in good])
            missing = bad + [
                f for f, i in zip(good, infos, strict=True) if i.type != pafs.FileType.File
            ]
            if missing:
                shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
                raise _NotAVersion(
                    f"{where}: {len(missing)} of {len(files)} files listed in {METADATA} are "
                    f"missing from {self._version_uri(name, version)}: {shown}"
                )
        return doc

    def _scan(self, name: str) -> tuple[list[ModelVersion], list[str]]:
        """The valid versions of a model (ascending) and descriptions of everything skipped."""
        _check_name(name)
        aliases, problems = self._read_aliases(name)
        by_version: dict[int, list[str]] = {}
        for alias, v in sorted(aliases.items()):
            by_version.setdefault(v, []).append(alias)
        found: list[tuple[int, str]] = []
        for info in self._entries(self._path(name, "versions")):
            number = _version_number(info.base_name)
            if info.base_name.startswith("."):
                continue
            if number is None or info.type != pafs.FileType.Directory:
                problems.append(f"model {name!r}: unexpected entry {info.path} in versions/")
                continue
            found.append((number, info.path))
        valid = []
        for number, _ in sorted(found):
            try:
                doc = self._inspect(name, number)
            except _NotAVersion as e:
                if not e.silent:
                    problems.append(e.reason)
                continue
            uri = self._version_uri(name, number)
            valid.append(ModelVersion(name, number, uri, doc, by_version.get(number, [])))
        numbers = {mv.version for mv in valid}
        for alias, v in sorted(aliases.items()):
            if v not in numbers:
                problems.append(
                    f"model {name!r}: alias {alias!r} points at version {v}, which is missing, "
                    "deleted or invalid"
                )
        return valid, problems

    def versions(self, name: str) -> list[ModelVersion]:
        """The complete, valid versions of a model, ascending; [] for an unknown model.

        Incomplete or corrupt versions (no or unparsable ``metadata.json``, a name or version
        that does not match the directory, files listed in the metadata that are missing) are
        skipped with a logged warning; :meth:`problems` describes them.

        Args:
            name: The model name.

        Returns:
            The valid versions, lowest number first.

        Raises:
            RegistryError: If the name is invalid.
        """
        valid, problems = self._scan(name)
        for p in problems:
            log.warning("model registry %s: %s", self.uri, p)
        return valid

    def problems(self, name: str) -> list[str]:
        """Descriptions of the versions :meth:`versions` skips and of dangling aliases.

        Args:
            name: The model name.

        Returns:
            One human-readable line per problem; [] if all is well.
        """
        return self._scan(name)[1]

    def _model_exists(self, name: str) -> bool:
        return self._fs.get_file_info(self._path(name)).type == pafs.FileType.Directory

    def _unknown_model(self, name: str) -> RegistryError:
        known = ", ".join(self.list_models()[:10]) or "none"
        return RegistryError(f"no model {name!r} in registry {self.uri} (models: {known})")

    def _version(self, name: str, version: int) -> ModelVersion:
        try:
            doc = self._inspect(name, version)
        except _NotAVersion as e:
            if not self._model_exists(name):
                raise self._unknown_model(name) from None
            raise RegistryError(e.reason) from None
        aliases = sorted(a for a, v in self.aliases(name).items() if v == version)
        return ModelVersion(name, version, self._version_uri(name, version), doc, aliases)

    def get(self, name: str, ref: int | str | None = None) -> ModelVersion:
        """One valid version of a model.

        Args:
            name: The model name.
            ref: A version number (``3`` or ``"3"``), an alias (``"champion"``), or ``"latest"``
                / None for the highest valid version.

        Returns:
            The version.

        Raises:
            RegistryError: If the model, version or alias is unknown, or the version is
                incomplete or corrupt.

        Example:
            >>> reg.get("flights-delay", "champion").metadata["metrics"]  # doctest: +SKIP
            {'auc': 0.83}
        """
        _check_name(name)
        if ref is None or ref == "latest":
            valid, problems = self._scan(name)
            if valid:
                return valid[-1]
            if not self._model_exists(name):
                raise self._unknown_model(name)
            detail = f": {problems[0]}" if problems else ""
            raise RegistryError(f"model {name!r} has no valid versions in {self.uri}{detail}")
        if isinstance(ref, str) and ref.isdigit():
            ref = int(ref)
        if isinstance(ref, str):
            _check_alias(ref)
            aliases = self.aliases(name)
            if ref not in aliases:
                if not self._model_exists(name):
                    raise self._unknown_model(name)
                known = ", ".join(sorted(aliases)) or "none"
                raise RegistryError(f"model {name!r} has no alias {ref!r} (aliases: {known})")
            try:
                return self._version(name, aliases[ref])
            except RegistryError as e:
                raise RegistryError(f"alias {ref!r} of {name!r}: {e}") from None
        return self._version(name, _check_version_number(ref))

    def resolve(self, ref: str) -> ModelVersion:
        """The version a reference names: ``NAME``, ``NAME@3``, ``NAME@champion``, ``NAME@latest``.

        Args:
            ref: The reference.

        Returns:
            The version (the latest valid one for a bare ``NAME``).

        Raises:
            RegistryError: If the reference is malformed or names nothing valid.
        """
        name, sep, rest = str(ref).partition("@")
        if (
            not _NAME_RE.match(name)
            or (sep and not rest.isdigit() and not _ALIAS_RE.match(rest))
            or (rest.isdigit() and int(rest) < 1)
        ):
            raise RegistryError(
                f"invalid model reference {ref!r}: expected NAME, NAME@VERSION or NAME@ALIAS"
            )
        return self.get(name, rest if sep else None)

    def local_path(self, mv: ModelVersion, cache_dir: str | os.PathLike[str] | None = None) -> Path:
        """A local directory holding the files of a version.

        For a local registry this is the version's own directory (do not modify it). For a
        remote one the files are downloaded once into ``cache_dir`` (default:
        ``$RAYLINE_MODEL_CACHE`` or ``~/.cache/rayline/models``); versions are immutable, so a
        cached copy stays valid.

        Args:
            mv: A version from this registry.
            cache_dir: Where to keep downloaded versions.

        Returns:
            The directory.

        Raises:
            RegistryError: If the version is no longer valid (deleted or corrupted).
        """
        self._version(mv.name, mv.version)
        if self._local:
            return Path(self._version_path(mv.name, mv.version))
        root = Path(
            cache_dir
            or os.environ.get("RAYLINE_MODEL_CACHE")
            or Path.home() / ".cache" / "rayline" / "models"
        ).expanduser()
        key = hashlib.sha256(self.uri.encode()).hexdigest()[:16]
        target = root / key / mv.name / str(mv.version)
        if (target / METADATA).is_file():
            return target
        tmp = target.parent / f".{mv.version}.{uuid.uuid4().hex}"
        vdir = self._version_path(mv.name, mv.version)
        try:
            infos = [i for i in self._entries(vdir, recursive=True) if i.type == pafs.FileType.File]
            # metadata.json last, so a copy with it is complete
            infos.sort(key=lambda i: i.path == f"{vdir}/{METADATA}")
            for info in infos:
                rel = info.path[len(vdir) + 1 :]
                if rel.startswith("."):
                    continue
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                with self._fs.open_input_stream(info.path) as f, open(tmp / rel, "wb") as o:
                    shutil.copyfileobj(f, o, length=8 << 20)
            tmp.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(tmp, target)
            except OSError:
                if not (target / METADATA).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    # -- aliases ---------------------------------------------------------------------------

    def _read_aliases(self, name: str) -> tuple[dict[str, int], list[str]]:
        aliases: dict[str, int] = {}
        problems = []
        for info in self._entries(self._path(name, "aliases")):
            if info.base_name.startswith(".") or info.type != pafs.FileType.File:
                continue
            text = (self._read_text(info.path) or "").strip()
            number = _version_number(text)
            if not _ALIAS_RE.match(info.base_name) or number is None:
                problems.append(f"model {name!r}: unreadable alias file {info.path}: {text!r}")
                continue
            aliases[info.base_name] = number
        return aliases, problems

    def aliases(self, name: str) -> dict[str, int]:
        """The aliases of a model and the versions they point at; {} for an unknown model.

        Args:
            name: The model name.

        Returns:
            ``{alias: version}``, sorted by alias.
        """
        _check_name(name)
        return dict(sorted(self._read_aliases(name)[0].items()))

    def _record_move(
        self, name: str, alias: str, old: int | None, new: int | None, reason: str | None
    ) -> None:
        event = {
            "alias": alias,
            "from": old,
            "to": new,
            "at": now_iso(),
            "by": _who(),
            "reason": reason,
        }
        self._append_line(self._path(name, "alias_history.jsonl"), json.dumps(event) + "\n")

    def set_alias(
        self, name: str, alias: str, version: int, reason: str | None = None
    ) -> int | None:
        """Point an alias at a valid version (atomically) and record the move in the history.

        Args:
            name: The model name.
            alias: The alias (letters, digits, ``_ -``, starting with a letter; not ``latest``).
            version: The version number; it must exist and be valid.
            reason: Why, for the history (e.g. "auc 0.83 > 0.81").

        Returns:
            The version the alias pointed at before, or None if it is new.

        Raises:
            RegistryError: If the alias is invalid or the version is missing or corrupt.
        """
        _check_name(name)
        _check_alias(alias)
        _check_version_number(version)
        try:
            self._version(name, version)
        except RegistryError as e:
            raise RegistryError(
                f"cannot point alias {alias!r} of {name!r} at version {version}: {e}"
            ) from None
        previous = self.aliases(name).get(alias)
        if previous == version:
            return previous
        self._write_text(self._alias_path(name, alias), f"{version}\n")
        self._record_move(name, alias, previous, version, reason)
        log.info("model %s: alias %s %s -> %d", name, alias, previous, version)
        return previous

    def delete_alias(self, name: str, alias: str, reason: str | None = None) -> None:
        """Remove an alias (the version stays) and record it in the history.

        Args:
            name: The model name.
            alias: The alias.
            reason: Why, for the history.

        Raises:
            RegistryError: If the model has no such alias.
        """
        _check_name(name)
        _check_alias(alias)
        previous = self.aliases(name).get(alias)
        if previous is None:
            raise RegistryError(f"model {name!r} has no alias {alias!r}")
        self._fs.delete_file(self._alias_path(name, alias))
        self._record_move(name, alias, previous, None, reason)

    def alias_history(self, name: str) -> list[dict[str, Any]]:
        """Every alias move of a model, oldest first: alias, from, to, at, by, reason.

        Args:
            name: The model name.

        Returns:
            The events (``to`` is None for a removed alias); [] if there are none.
        """
        _check_name(name)
        path = self._path(name, "alias_history.jsonl")
        events = []
        for i, line in enumerate((self._read_text(path) or "").splitlines(), 1):
            if not line.strip():
                continue
            try:
                events.append(json.loads(line))
            except ValueError:
                log.warning("model registry: skipping unreadable line %d of %s", i, path)
        return events

    # -- deleting --------------------------------------------------------------------------

    def delete_version(self, name: str, version: int, force: bool = False) -> None:
        """Delete a version (valid or broken). Its number is never reused.

        Args:
            name: The model name.
            version: The version number.
            force: Also remove the aliases pointing at it; without it, such a version is kept.

        Raises:
            RegistryError: If the version does not exist, or holds aliases and not ``force``.
        """
        _check_name(name)
        _check_version_number(version)
        vdir = self._version_path(name, version)
        dir_info, tomb_info = self._fs.get_file_info([vdir, f"{vdir}/{TOMBSTONE}"])
        if dir_info.type != pafs.FileType.Directory or tomb_info.type != pafs.FileType.NotFound:
            if not self._model_exists(name):
                raise self._unknown_model(name)
            raise RegistryError(f"model {name!r} has no version {version}")
        holders = sorted(a for a, v in self.aliases(name).items() if v == version)
        if holders and not force:
            raise RegistryError(
                f"model {name!r} version {version} holds alias(es) {', '.join(holders)}: move "
                "them first or delete with force"
            )
        for alias in holders:
            self.delete_alias(name, alias, reason=f"version {version} deleted")
        # The tombstone first: it hides the version at once and keeps its number taken.
        tomb = {"deleted_at": now_iso(), "deleted_by": _who(), "removed_aliases": holders}
        self._write_text(f"{vdir}/{TOMBSTONE}", _dumps(tomb))
        for info in self._entries(vdir):
            if info.base_name != TOMBSTONE:
                self._delete(info)
        log.info("model %s: deleted version %d", name, version)
