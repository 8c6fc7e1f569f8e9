"""Resolving the consortium hashing secret from where the spec says it lives."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import os
import re


class SecretError(RuntimeError):
    """The secret the spec references cannot be found, or is too weak."""


#: How to make a strong secret (shown with every refusal).
MAKE_ONE = "python3 -c 'import secrets; print(secrets.token_hex(32))'"
_HEX = re.compile(r"^[0-9A-Fa-f]+$")
_BASE64 = re.compile(r"^(?:[A-Za-z0-9+/]+|[A-Za-z0-9_\-]+)={0,2}$")


def _base64_bytes(value: str) -> int | None:
    """Bytes ``value`` decodes to as canonical base64 (standard or urlsafe, padding
    optional), or None when it is not base64 exactly as an encoder writes it."""
    if not _BASE64.match(value):
        return None
    body = value.rstrip("=")
    urlsafe = "-" in body or "_" in body
    try:
        data = base64.b64decode(
            body + "=" * (-len(body) % 4), altchars=b"-_" if urlsafe else None, validate=True
        )
    except (binascii.Error, ValueError):
        return None
    again = (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(data).decode()
    return len(data) if again.rstrip("=") == body else None


def is_strong_secret(value: str) -> bool:
    """At least 128 bits, by one of three readings (each needs >= 8 distinct characters):

    (a) >= 32 hex characters (either case);
    (b) >= 22 characters of canonical base64 (standard or urlsafe, padding optional) that
        decode to >= 16 bytes and use both upper- and lower-case letters (as random base64
        does; one-case text is judged by (c));
    (c) anything else of >= 32 characters with >= 16 distinct characters.
    """
    distinct = len(set(value.lower())) if _HEX.match(value) else len(set(value))
    if distinct < 8:
        return False
    if _HEX.match(value):
        return len(value) >= 32
    mixed = any(c.isupper() for c in value) and any(c.islower() for c in value)
    size = _base64_bytes(value) if mixed else None
    if size is not None and size >= 16 and len(value) >= 22:
        return True
    return len(value) >= 32 and distinct >= 16


def estimated_bits(value: str) -> int:
    """A rough upper estimate of a secret's strength: length x log2(distinct characters)."""
    distinct = len(set(value))
    return int(len(value) * math.log2(distinct)) if distinct > 1 else 0


def checked(value: str, where: str) -> bytes:
    """``value`` as key bytes, or :class:`SecretError` (naming ``where``, never the value)."""
    if not is_strong_secret(value):
        bits = min(estimated_bits(value), 127)  # refused: under 128 bits by the rules above
        raise SecretError(
            f"the consortium secret in {where} is too weak (about {bits} bits); "
            f"make one with: {MAKE_ONE}"
        )
    return value.encode()


def resolve_secret(*, env: str | None = None, block: str | None = None) -> bytes:
    """Read the secret from an environment variable or a Prefect Secret block; a secret
    weaker than 128 bits (:func:`is_strong_secret`) is refused."""
    if env is not None:
        value = os.environ.get(env)
        if not value:
            raise SecretError(
                f"the consortium secret is read from environment variable {env}, which is not "
                f"set: set it to the consortium's secret (the same at every party) with "
                f"export {env}=..., or make a new one with export {env}=$({MAKE_ONE})"
            )
        return checked(value, env)
    if block is not None:
        from prefect.blocks.system import Secret

        try:
            secret = Secret.load(block)
        except ValueError as exc:
            raise SecretError(
                f"the consortium secret is read from Prefect Secret block {block!r}, which "
                "does not exist on this Prefect server: create it in the UI (Blocks, Secret) "
                f'or with python3 -c "from prefect.blocks.system import Secret; '
                f"Secret(value='...').save('{block}')\""
            ) from exc
        value = secret.get()  # type: ignore[union-attr]
        if not isinstance(value, str) or not value:
            raise SecretError(f"Prefect Secret block {block!r} holds no text secret")
        return checked(value, f"Prefect Secret block {block!r}")
    raise SecretError("no secret reference given")


def secret_fingerprint(secret: bytes) -> str:
    """A one-way tag of the secret: changes when the secret does, reveals nothing of it."""
    return hmac.new(secret, b"fedfuse/secret-fingerprint/v1", hashlib.sha256).hexdigest()[:16]
