"""Resolving the consortium hashing secret from where the spec says it lives."""

from __future__ import annotations

import hashlib
import hmac
import os


class SecretError(RuntimeError):
    """The secret the spec references cannot be found."""


def resolve_secret(*, env: str | None = None, block: str | None = None) -> bytes:
    """Read the secret from an environment variable or a Prefect Secret block."""
    if env is not None:
        value = os.environ.get(env)
        if not value:
            raise SecretError(
                f"the consortium secret is read from environment variable {env}, which is not set"
            )
        return value.encode()
    if block is not None:
        from prefect.blocks.system import Secret

        try:
            secret = Secret.load(block)
        except ValueError as exc:
            raise SecretError(f"no Prefect Secret block named {block!r}: {exc}") from exc
        value = secret.get()  # type: ignore[union-attr]
        if not isinstance(value, str) or not value:
            raise SecretError(f"Prefect Secret block {block!r} holds no text secret")
        return value.encode()
    raise SecretError("no secret reference given")


def secret_fingerprint(secret: bytes) -> str:
    """A one-way tag of the secret: changes when the secret does, reveals nothing of it."""
    return hmac.new(secret, b"fedfuse/secret-fingerprint/v1", hashlib.sha256).hexdigest()[:16]
