"""Key text and key files, in the format ``wg genkey`` / ``wg pubkey`` use.

A key is the standard base64 of its 32 bytes on one line (44 characters), so
operators can move keys between jvpn-trio and WireGuard tooling by hand.
This module is the I/O edge for keys (the core never touches files): every
problem becomes a :class:`KeyFileError` whose message is one line the CLI can
print as it is, naming the file and what to do.

A private key file must not be accessible by group or others: like ``ssh``,
we refuse to load it rather than warn, and the message gives the ``chmod``.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat

from jvpn_trio.core.noise import KEY_LEN, StaticKeypair, generate_static
from jvpn_trio.core.ids import RandomBytes

#: Length of a key's base64 text: 32 bytes -> 44 characters with padding.
KEY_TEXT_LEN = 44
#: A key file is one short line; refuse to read anything much larger.
MAX_KEY_FILE_BYTES = 1024
#: Permission bits for group and others: any of them set on a private key file is refused.
GROUP_OTHER_PERMISSIONS = 0o077
#: The mode :func:`write_private_key` creates files with.
PRIVATE_KEY_MODE = 0o600


class KeyFileError(Exception):
    """A key that cannot be used; ``str(exc)`` is one line fit for the CLI."""


def parse_key_text(text: str, *, what: str = "key") -> bytes:
    """The 32 bytes of a base64 key line (surrounding whitespace ignored).  Raises KeyFileError."""
    line = text.strip()
    if not line:
        raise KeyFileError(f"{what} is empty")
    if "\n" in line or "\r" in line:
        raise KeyFileError(f"{what} must be a single line of base64")
    try:
        raw = base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"{what} is not valid base64 (expected {KEY_TEXT_LEN} characters)") from None
    if len(raw) != KEY_LEN:
        raise KeyFileError(f"{what} decodes to {len(raw)} bytes, expected {KEY_LEN}")
    return raw


def _key_text(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def generate_private_key_text(random_bytes: RandomBytes) -> str:
    """A new private key as base64 text (``wg genkey``), from 32 injected random bytes."""
    return _key_text(generate_static(random_bytes).private)


def public_from_private_text(text: str) -> str:
    """The public key text for a private key text (``wg pubkey``).  Raises KeyFileError."""
    return _key_text(StaticKeypair(parse_key_text(text, what="private key")).public)


def load_public_key_text(text: str) -> bytes:
    """A peer's public key from its base64 text (a config value).  Raises KeyFileError."""
    return parse_key_text(text, what="public key")


def load_private_key(path: str | os.PathLike[str]) -> bytes:
    """Read a private key file, refusing one that group or others can access.

    Raises KeyFileError for a missing or unreadable file, loose permissions
    (with the ``chmod 600`` to run), or content that is not one base64 line of
    32 bytes.
    """
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDONLY)
    except FileNotFoundError:
        raise KeyFileError(f"private key file {name} does not exist") from None
    except PermissionError:
        raise KeyFileError(f"cannot read private key file {name}: permission denied") from None
    except OSError as exc:
        raise KeyFileError(f"cannot open private key file {name}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"private key file {name} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & GROUP_OTHER_PERMISSIONS:
            raise KeyFileError(
                f"private key file {name} is accessible by group or others (mode {mode:04o}); "
                f"run: chmod 600 {name}"
            )
        content = os.read(fd, MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read private key file {name}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(content) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"private key file {name} is too large to be a key")
    try:
        text = content.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError(f"private key file {name} is not base64 text") from None
    return parse_key_text(text, what=f"private key in {name}")


def write_private_key(path: str | os.PathLike[str], text: str) -> None:
    """Create ``path`` with mode 0600 holding the key line; never overwrites.  Raises KeyFileError."""
    name = os.fspath(path)
    parse_key_text(text, what="private key")
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_KEY_MODE)
    except FileExistsError:
        raise KeyFileError(f"{name} already exists; refusing to overwrite a key") from None
    except OSError as exc:
        raise KeyFileError(f"cannot create {name}: {exc.strerror}") from None
    try:
        os.fchmod(fd, PRIVATE_KEY_MODE)  # the umask may have narrowed it; never widened
        os.write(fd, (text.strip() + "\n").encode("ascii"))
    except OSError as exc:
        raise KeyFileError(f"cannot write {name}: {exc.strerror}") from None
    finally:
        os.close(fd)
