"""CURVE encryption and authentication helpers shared by broker, workers and producers.

Keys are ``zmq.auth`` certificate files: ``NAME.key`` (public) and ``NAME.key_secret`` (public + secret).
Generate them with ``python -m broker.security DIR NAME [NAME ...]`` (see ``docs/fleet.md``).

The broker is the CURVE server: it loads its secret file and, when given a directory of authorized public
keys, runs a ZAP authenticator that admits only those clients (workers and producers). Clients load their
own secret file and the broker's public key.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from broker.errors import ConfigError

log = logging.getLogger(__name__)


def _load(path: Path, need_secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load CURVE key {path}: {exc}") from None
    if need_secret and not secret:
        raise ConfigError(f"{path} holds no secret key (use the .key_secret file)")
    return public, secret


def setup_server(socket: zmq.Socket[bytes], secret_file: Path) -> None:
    """Make ``socket`` a CURVE server with the keys in ``secret_file``."""
    public, secret = _load(secret_file, need_secret=True)
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_server = True


def start_authenticator(
    context: zmq.Context[zmq.Socket[bytes]], authorized_dir: Path | None
) -> ThreadAuthenticator:
    """Start a ZAP authenticator admitting the public keys in ``authorized_dir`` (any key when None).

    Returns:
        The running authenticator; call ``stop()`` on shutdown.
    """
    auth = ThreadAuthenticator(context)
    auth.start()
    if authorized_dir is None:
        auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
        log.warning("CURVE enabled without an authorized-keys directory: any client key is accepted")
    else:
        if not authorized_dir.is_dir():
            auth.stop()
            raise ConfigError(f"authorized-keys directory {authorized_dir} does not exist")
        auth.configure_curve(domain="*", location=str(authorized_dir))
    return auth


@dataclass(frozen=True)
class ClientKeys:
    """CURVE keys of a client (worker or producer).

    Attributes:
        secret_file: the client's own ``.key_secret`` file.
        server_public_file: the broker's public ``.key`` file.
    """

    secret_file: Path
    server_public_file: Path

    def apply(self, socket: zmq.Socket[bytes]) -> None:
        """Configure ``socket`` (before connect) as a CURVE client."""
        public, secret = _load(self.secret_file, need_secret=True)
        server_public, _ = _load(self.server_public_file, need_secret=False)
        socket.curve_secretkey = secret
        socket.curve_publickey = public
        socket.curve_serverkey = server_public


def client_keys(secret_file: str | Path | None, server_public_file: str | Path | None) -> ClientKeys | None:
    """ClientKeys from two optional paths; both or neither must be given.

    Raises:
        ConfigError: only one of the two was given.
    """
    if secret_file is None and server_public_file is None:
        return None
    if secret_file is None or server_public_file is None:
        raise ConfigError("CURVE needs both the client's secret key file and the broker's public key file")
    return ClientKeys(Path(secret_file), Path(server_public_file))


def generate_keys(directory: str | Path, names: Sequence[str]) -> list[Path]:
    """Create a key pair ``NAME.key`` / ``NAME.key_secret`` per name in ``directory``.

    Returns:
        The public key files.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        public, secret = zmq.auth.create_certificates(str(d), name)
        Path(secret).chmod(0o600)
        out.append(Path(public))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m broker.security DIR NAME...``: generate CURVE key pairs."""
    p = argparse.ArgumentParser(prog="python -m broker.security", description="generate CURVE key pairs")
    p.add_argument("directory")
    p.add_argument("names", nargs="+", help="e.g. broker worker producer")
    args = p.parse_args(argv)
    for path in generate_keys(args.directory, args.names):
        sys.stdout.write(f"{path} and {path}_secret\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
