"""API keys for the serving endpoints: ``Authorization: Bearer <key>``.

Keys are random tokens; only their SHA-256 hashes are configured, as YAML or JSON entries in an
environment variable or a file kept out of the repository::

    keys:
      - id: analytics          # a name for the key, safe to log
        sha256: 3f1c...        # hashlib.sha256(key.encode()).hexdigest()
        models: ["*"]          # the models it may use ("*": all)

``python -m rayline.serve.auth new-key --id analytics --models flights_arr_delay`` prints a
new key (give it to the client) and its entry (put it in the configuration). A presented key is
hashed and compared with every entry in constant time; neither the key nor its hash is logged.

Example:
    >>> ring = KeyRing([ApiKey("ci", hash_key("s3cret"), ("flights",))])
    >>> ring.identify("Bearer s3cret").id
    'ci'
    >>> ring.identify("Bearer nope") is None
    True
    >>> ring.identify("Bearer s3cret").allows("other")
    False
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import re
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .config import AuthArgs

__all__ = ["ApiKey", "KeyRing", "KeyConfigError", "hash_key", "new_key", "load_keys"]

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class KeyConfigError(ValueError):
    """The key configuration cannot be used; the message says where and why (never a key)."""


def hash_key(key: str) -> str:
    """The hex SHA-256 of a key, as configured."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A new random key (256 bits)."""
    return "rl_" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class ApiKey:
    """One configured key.

    Attributes:
        id: The key's name (what logs and metrics may show).
        sha256: The hex SHA-256 of the key.
        models: The model names it may use; ``"*"`` for all.
    """

    id: str
    sha256: str
    models: tuple[str, ...] = ("*",)

    def allows(self, model: str) -> bool:
        return "*" in self.models or model in self.models


class KeyRing:
    """The configured keys.

    Args:
        keys: The entries; ids must be unique.
    """

    def __init__(self, keys: list[ApiKey]) -> None:
        self.keys = list(keys)
        self._digests = [bytes.fromhex(k.sha256) for k in self.keys]

    def __len__(self) -> int:
        return len(self.keys)

    def identify(self, authorization: str | None) -> ApiKey | None:
        """The key an ``Authorization`` header presents, or None (absent, malformed, unknown)."""
        if not authorization:
            return None
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found = None
        for key, d in zip(self.keys, self._digests, strict=True):
            if hmac.compare_digest(digest, d):  # no early exit: every entry is compared
                found = key
        return found


def parse_keys(text: str, where: str) -> list[ApiKey]:
    """Key entries from YAML or JSON text (``{keys: [...]}`` or a bare list).

    Raises:
        KeyConfigError: naming ``where`` and the entry (by index or id).
    """
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise KeyConfigError(f"{where}: not YAML or JSON ({type(e).__name__})") from None
    if isinstance(doc, dict):
        doc = doc.get("keys")
    if not isinstance(doc, list):
        raise KeyConfigError(f"{where}: expected a list of keys (or {{keys: [...]}})")
    keys: list[ApiKey] = []
    for i, entry in enumerate(doc):
        if not isinstance(entry, dict):
            raise KeyConfigError(f"{where}: keys[{i}] is not a mapping")
        extra = sorted(set(entry) - {"id", "sha256", "models"})
        if extra:
            raise KeyConfigError(f"{where}: keys[{i}]: unknown field(s) {', '.join(extra)}")
        kid = entry.get("id")
        if not isinstance(kid, str) or not kid:
            raise KeyConfigError(f"{where}: keys[{i}] needs an id")
        raw = entry.get("sha256")
        digest = raw.lower() if isinstance(raw, str) else ""
        if not _HEX64.match(digest):
            raise KeyConfigError(
                f"{where}: key {kid!r}: sha256 must be a string of 64 hex digits (the hash of "
                "the key, never the key itself; quote it in YAML)"
            )
        models = entry.get("models", ["*"])
        if isinstance(models, str):
            models = [models]
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            raise KeyConfigError(f"{where}: key {kid!r}: models must be a list of names")
        keys.append(ApiKey(kid, digest, tuple(models)))
    ids = [k.id for k in keys]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise KeyConfigError(f"{where}: key id(s) {', '.join(dupes)} used more than once")
    return keys


def load_keys(args: AuthArgs, environ: Mapping[str, str] | None = None) -> KeyRing | None:
    """The keys the auth settings name: the file's and the environment variable's entries.

    Args:
        args: The ``auth`` settings.
        environ: The environment (default: ``os.environ``).

    Returns:
        None when auth is disabled, else the keys.

    Raises:
        KeyConfigError: auth is enabled but no key is configured, or an entry is malformed.
    """
    if not args.enabled:
        return None
    env = os.environ if environ is None else environ
    keys: list[ApiKey] = []
    sources = []
    if args.keys_file:
        path = Path(args.keys_file).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise KeyConfigError(f"auth.keys_file {path}: {e.strerror or e}") from None
        keys += parse_keys(text, f"auth.keys_file {path}")
        sources.append(str(path))
    if args.keys_env and env.get(args.keys_env):
        keys += parse_keys(env[args.keys_env], f"${args.keys_env}")
        sources.append(f"${args.keys_env}")
    if not keys:
        where = " or ".join(
            s
            for s in (args.keys_file and str(args.keys_file), args.keys_env and f"${args.keys_env}")
            if s
        )
        raise KeyConfigError(f"auth is enabled but no API key is configured (looked in {where})")
    ids = [k.id for k in keys]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise KeyConfigError(f"key id(s) {', '.join(dupes)} configured in more than one place")
    return KeyRing(keys)


def main(argv: list[str] | None = None) -> int:
    """``python -m rayline.serve.auth new-key``: a new key and its configuration entry."""
    p = argparse.ArgumentParser(prog="python -m rayline.serve.auth")
    sub = p.add_subparsers(dest="cmd", required=True)
    nk = sub.add_parser("new-key", help="print a new API key and its entry for the key config")
    nk.add_argument("--id", required=True, help="a name for the key (shown in logs)")
    nk.add_argument("--models", default="*", help="comma-separated model names (default: all)")
    nk.add_argument("--json", action="store_true", help="print the entry as JSON")
    args = p.parse_args(argv)
    key = new_key()
    entry: dict[str, Any] = {
        "id": args.id,
        "sha256": hash_key(key),
        "models": [m.strip() for m in args.models.split(",") if m.strip()],
    }
    print(f"key (give it to the client; it is not stored anywhere): {key}", file=sys.stderr)
    if args.json:
        print(json.dumps(entry))
    else:
        print(yaml.safe_dump({"keys": [entry]}, sort_keys=False, default_flow_style=None), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
