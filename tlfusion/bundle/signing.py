"""Bundle authenticity: an optional HMAC-SHA256 signature over a bundle's manifest, keyed by the user's secret.

The key is the UTF-8 bytes of the environment variable `TLFUSION_BUNDLE_KEY` (at least 16 characters). Saving with
the key set writes `signature.json`::

    {"algorithm": "HMAC-SHA256", "signed_file": "manifest.json", "signature": "<64 hex digits>"}

where the signature is HMAC-SHA256(key, the exact bytes of manifest.json). Since the manifest holds the sha256 of
every other file, the signature covers the whole bundle; `openssl dgst -sha256 -hmac "$TLFUSION_BUNDLE_KEY"
manifest.json` computes the same digest. Loading with the key set refuses a bundle whose signature is missing or
does not match; loading without it checks the manifest only ("integrity only").
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path

from tlfusion.errors import InputError

KEY_ENV = "TLFUSION_BUNDLE_KEY"
SIGNATURE = "signature.json"
ALGORITHM = "HMAC-SHA256"
MIN_KEY_LENGTH = 16
SIGNED = "signed"
INTEGRITY_ONLY = "integrity only"


def bundle_key() -> bytes | None:
    """The signing key from `TLFUSION_BUNDLE_KEY`, None when unset; a too short key is an InputError."""
    value = os.environ.get(KEY_ENV)
    if value is None:
        return None
    if len(value) < MIN_KEY_LENGTH:
        raise InputError(f"{KEY_ENV}: {len(value)} characters; use at least {MIN_KEY_LENGTH} random ones")
    return value.encode("utf-8")


def key_id() -> str:
    """A one-way tag of the current key ('' when none), so that changing the key changes a stage's key."""
    key = bundle_key()
    return hmac.new(key, b"tlfusion key id", hashlib.sha256).hexdigest()[:16] if key else ""


def write_signature(folder: Path, manifest: bytes) -> None:
    """Write `folder/signature.json` signing `manifest` (the bytes of manifest.json) when a key is set."""
    key = bundle_key()
    if key is None:
        return
    content = {"algorithm": ALGORITHM, "signed_file": "manifest.json", "signature": _digest(key, manifest)}
    (folder / SIGNATURE).write_text(json.dumps(content, indent=1, sort_keys=True) + "\n")


def check_signature(folder: Path, manifest: bytes) -> str:
    """The bundle's trust level, "signed" or "integrity only", with why; InputError naming the bundle when a key is
    set and the signature is missing, malformed or does not match `manifest` (the bytes of manifest.json)."""
    key = bundle_key()
    path = folder / SIGNATURE
    if key is None:
        present = path.is_file() and not path.is_symlink()
        unchecked = "it carries a signature, not checked" if present else "not signed"
        return f"{INTEGRITY_ONLY} (manifest sha256s; {KEY_ENV} not set, {unchecked})"
    if path.is_symlink() or not path.is_file():
        raise InputError(f"{folder}: bundle is not signed (no regular {SIGNATURE}) but {KEY_ENV} is set; not loaded")
    expected = _read_signature(path)
    if not hmac.compare_digest(expected, _digest(key, manifest)):
        raise InputError(f"{folder}: bundle signature does not match (altered, or signed with another key)")
    return f"{SIGNED} ({ALGORITHM} of manifest.json verified with {KEY_ENV})"


def _read_signature(path: Path) -> str:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: unreadable signature ({type(error).__name__})") from None
    if not isinstance(content, dict) or content.get("algorithm") != ALGORITHM:
        raise InputError(f"{path}: not a tlfusion {ALGORITHM} signature")
    signature = content.get("signature")
    if not isinstance(signature, str):
        raise InputError(f"{path}: not a tlfusion {ALGORITHM} signature")
    return signature


def _digest(key: bytes, manifest: bytes) -> str:
    return hmac.new(key, manifest, hashlib.sha256).hexdigest()
