"""Membership proof for distributed runs: peers that share a secret admit only each other.

Without a secret, any process that reaches the rendezvous endpoint with a matching config
fingerprint joins a run. With one (`comm.auth_key_file`, or the secret itself in the
environment variable DECLORA_AUTH_KEY), every peer proves in the handshake that it holds it:

1. each peer draws a fresh 32-byte nonce (`secrets`) and all peers share their nonces;
2. each peer sends HMAC-SHA256(secret, protocol tag | its rank | world size | every nonce);
3. each peer recomputes every other peer's tag and compares it in constant time.

The secret never travels, and a tag is worthless in another run (the nonces are fresh) or for
another rank. Only JSON text in uint8 tensors travels; nothing is pickled. A peer that cannot
prove membership is refused, and every peer stops with a message that names it.

What this does NOT do: gloo (and NCCL) do not encrypt. Anyone who can read the network between
peers sees every adapter and head that is exchanged, and an attacker on the path can alter
messages after the handshake. On untrusted networks run the peers inside a VPN or an SSH/
WireGuard tunnel; the secret only keeps strangers from joining.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from declora.errors import ConfigError, DecloraError

AUTH_ENV = "DECLORA_AUTH_KEY"
MIN_KEY_BYTES = 16
_PROTOCOL = b"declora-membership-v1"


class AuthRefused(DecloraError):
    """A peer could not prove that it holds the run's shared secret."""


def load_key(path: str | None) -> bytes | None:
    """The shared secret from `comm.auth_key_file` or DECLORA_AUTH_KEY (the file wins); None
    when neither is set. Surrounding whitespace (a trailing newline) is not part of it."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError(f"comm.auth_key_file={path!r} is not a file")
        key = p.read_bytes().strip()
        where = f"comm.auth_key_file={path!r}"
    elif os.environ.get(AUTH_ENV):
        key, where = os.environ[AUTH_ENV].strip().encode(), AUTH_ENV
    else:
        return None
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(
            f"{where} holds {len(key)} bytes; a shared secret needs at least {MIN_KEY_BYTES} "
            "(e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`)"
        )
    return key


def tag(key: bytes, rank: int, world: int, nonces: list[str]) -> str:
    """Peer `rank`'s proof: an HMAC over this run's nonces, its rank and the world size."""
    msg = b"|".join([_PROTOCOL, str(rank).encode(), str(world).encode(), *map(str.encode, nonces)])
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def authenticate(
    key: bytes | None, rank: int, world: int, gather: Callable[[Any], list[Any]], failed: bool
) -> None:
    """Run the membership proof with every peer (`gather` shares JSON with all of them, in rank
    order). Every peer makes the same collectives whatever it holds; `failed`: this peer could
    not start (the handshake reports why next, so the proof is skipped by everyone)."""
    mine = {"auth": key is not None, "nonce": secrets.token_hex(32), "failed": failed}
    everyone = gather(mine)
    ok = all(isinstance(e, dict) and isinstance(e.get("nonce"), str) for e in everyone)
    if not ok:
        raise AuthRefused("a peer sent a start-up message without a nonce; is it a declora peer?")
    if any(e.get("failed") for e in everyone):
        return
    keyed = [i for i, e in enumerate(everyone) if e.get("auth") is True]
    if not keyed:
        return
    others = [i for i in range(world) if i != rank]
    if len(keyed) < world:
        if key is None:
            raise AuthRefused(
                f"peer {rank}: peer(s) {[i for i in keyed if i != rank]} require a shared "
                f"secret and this peer has none: set comm.auth_key_file or {AUTH_ENV}"
            )
        lacking = [i for i in range(world) if i not in keyed]
        raise AuthRefused(
            f"peer {rank}: peer(s) {lacking} hold no shared secret, so they cannot prove "
            "membership: refused (every peer needs the same comm.auth_key_file or "
            f"{AUTH_ENV})"
        )
    assert key is not None
    nonces = [str(e["nonce"]) for e in everyone]
    tags = gather({"tag": tag(key, rank, world, nonces)})
    bad = [
        i
        for i in others
        if not (isinstance(tags[i], dict) and isinstance(tags[i].get("tag"), str))
        or not hmac.compare_digest(str(tags[i]["tag"]), tag(key, i, world, nonces))
    ]
    if not bad:
        return
    if 2 * len(bad) > len(others):
        raise AuthRefused(
            f"peer {rank}: this peer's shared secret does not match what peer(s) {bad} prove "
            f"(HMAC over fresh nonces): this peer is refused; check its comm.auth_key_file or "
            f"{AUTH_ENV}"
        )
    raise AuthRefused(
        f"peer {rank}: peer(s) {bad} could not prove they hold the shared secret (HMAC over "
        f"fresh nonces did not match): refused; check their comm.auth_key_file or {AUTH_ENV}"
    )
