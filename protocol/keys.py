"""ZeroMQ CURVE keys for the control plane: create them, load them from files or the environment.

Encode servers are CURVE servers: they hold a secret key and accept only language servers whose
public keys lie in an authorized directory. Language servers are CURVE clients: they hold their
own secret key and the encoders' public key. Key files are ZeroMQ certificates
(``NAME.key`` public, ``NAME.key_secret`` secret) as written by ``epd-keys``.

Environment fallbacks (Z85 strings, 40 characters): ``EPD_CURVE_PUBLIC_KEY`` and
``EPD_CURVE_SECRET_KEY`` for this process's own pair, ``EPD_CURVE_SERVER_KEY`` for the encoders'
public key; ``EPD_CURVE_CLIENTS_DIR`` for the authorized directory.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth


@dataclass(frozen=True)
class CurveKeys:
    public: bytes
    secret: bytes
    server_public: bytes = b""  # clients only: the encoders' public key
    clients_dir: Path | None = None  # servers only: authorized client certificates


def _z85(value: str, what: str) -> bytes:
    key = value.strip().encode()
    if len(key) != 40:
        raise ValueError(f"{what} must be a 40-character Z85 CURVE key")
    return key


def load_pair(path: Path | None) -> tuple[bytes, bytes] | None:
    """This process's (public, secret) pair from a secret certificate file or the environment."""
    if path is not None:
        public, secret = zmq.auth.load_certificate(str(path))
        if not secret:
            raise ValueError(f"{path} holds no secret key (pass the .key_secret file)")
        return public, secret
    if os.environ.get("EPD_CURVE_SECRET_KEY"):
        return (
            _z85(os.environ.get("EPD_CURVE_PUBLIC_KEY", ""), "EPD_CURVE_PUBLIC_KEY"),
            _z85(os.environ["EPD_CURVE_SECRET_KEY"], "EPD_CURVE_SECRET_KEY"),
        )
    return None


def load_public(path: Path | None, env: str = "EPD_CURVE_SERVER_KEY") -> bytes | None:
    """A peer's public key from a certificate file or the environment."""
    if path is not None:
        return zmq.auth.load_certificate(str(path))[0]
    return _z85(os.environ[env], env) if os.environ.get(env) else None


def server_keys(secret_file: Path | None, clients_dir: Path | None) -> CurveKeys | None:
    """Keys for an encode server, or None when CURVE is off (no key given anywhere)."""
    pair = load_pair(secret_file)
    if pair is None:
        return None
    clients = clients_dir or (Path(d) if (d := os.environ.get("EPD_CURVE_CLIENTS_DIR")) else None)
    if clients is None or not clients.is_dir():
        raise ValueError("CURVE needs a directory of authorized client public keys "
                         "(--curve-clients or EPD_CURVE_CLIENTS_DIR)")  # fmt: skip
    return CurveKeys(pair[0], pair[1], clients_dir=clients)


def client_keys(secret_file: Path | None, server_file: Path | None) -> CurveKeys | None:
    """Keys for a language server, or None when CURVE is off."""
    pair, server = load_pair(secret_file), load_public(server_file)
    if pair is None and server is None:
        return None
    if pair is None or server is None:
        raise ValueError("CURVE needs both this server's keys (--curve-keys) and the encoders' "
                         "public key (--curve-server-key)")  # fmt: skip
    return CurveKeys(pair[0], pair[1], server_public=server)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="epd-keys",
        description="Create CURVE key pairs for the control plane: one for the encoders, one per "
        "language server. Copy each language server's NAME.key (public) into the encoders' "
        "authorized directory; give language servers the encoders' encoder.key.",
    )
    p.add_argument("directory", type=Path, help="where to write NAME.key and NAME.key_secret")
    p.add_argument("--name", action="append", default=[],
                   help="key pair name (repeatable; default: encoder and language)")  # fmt: skip
    args = p.parse_args(argv)
    args.directory.mkdir(parents=True, exist_ok=True)
    for name in args.name or ["encoder", "language"]:
        public, secret = zmq.auth.create_certificates(str(args.directory), name)
        os.chmod(secret, 0o600)
        print(f"wrote {public} (public) and {secret} (secret, mode 600)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
