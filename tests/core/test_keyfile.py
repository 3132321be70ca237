"""Key text and key files (``wg genkey`` / ``wg pubkey`` format).

Determinism: randomness is a constant ``random_bytes``; files live in ``tmp_path``.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from jvpn_trio import keyfile
from jvpn_trio.core.noise import StaticKeypair
from jvpn_trio.keyfile import KeyFileError


def fixed_random(n: int) -> bytes:
    return bytes(range(n))


PRIVATE_TEXT = keyfile.generate_private_key_text(fixed_random)


def write(path: Path, content: str | bytes, mode: int = 0o600) -> Path:
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    path.chmod(mode)
    return path


def message(exc: pytest.ExceptionInfo[KeyFileError]) -> str:
    text = str(exc.value)
    assert "\n" not in text  # one line for the CLI
    return text


def test_generated_key_is_44_chars_of_clamped_base64() -> None:
    assert len(PRIVATE_TEXT) == keyfile.KEY_TEXT_LEN
    raw = base64.b64decode(PRIVATE_TEXT)
    assert raw[0] & 0b111 == 0 and raw[31] & 0xC0 == 0x40
    assert keyfile.generate_private_key_text(fixed_random) == PRIVATE_TEXT  # deterministic


def test_public_from_private_matches_the_handshake_key() -> None:
    public_text = keyfile.public_from_private_text(PRIVATE_TEXT + "\n")
    expected = StaticKeypair(base64.b64decode(PRIVATE_TEXT)).public
    assert keyfile.load_public_key_text(public_text) == expected
    assert keyfile.load_public_key_text(f"  {public_text}\n") == expected


def test_load_private_key(tmp_path: Path) -> None:
    path = write(tmp_path / "client.key", PRIVATE_TEXT + "\n")
    assert keyfile.load_private_key(path) == base64.b64decode(PRIVATE_TEXT)
    assert keyfile.load_private_key(str(path)) == base64.b64decode(PRIVATE_TEXT)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError) as info:
        keyfile.load_private_key(tmp_path / "nope.key")
    assert "does not exist" in message(info)


def test_directory_is_not_a_key(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError) as info:
        keyfile.load_private_key(tmp_path)
    assert "not a regular file" in message(info)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o602, 0o610])
def test_loose_permissions_are_refused_with_the_chmod(tmp_path: Path, mode: int) -> None:
    path = write(tmp_path / "client.key", PRIVATE_TEXT, mode)
    with pytest.raises(KeyFileError) as info:
        keyfile.load_private_key(path)
    text = message(info)
    assert f"chmod 600 {path}" in text and f"{mode:04o}" in text


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_owner_only_permissions_are_accepted(tmp_path: Path, mode: int) -> None:
    assert len(keyfile.load_private_key(write(tmp_path / "k", PRIVATE_TEXT, mode))) == 32


def test_unreadable_file_reports_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulated: a real chmod 000 file is still readable when the tests run as root.
    def deny(*_: object) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("jvpn_trio.keyfile.os.open", deny)
    with pytest.raises(KeyFileError) as info:
        keyfile.load_private_key(tmp_path / "client.key")
    assert "permission denied" in message(info)


def test_other_open_errors_are_one_line(tmp_path: Path) -> None:
    path = write(tmp_path / "file", "x")
    with pytest.raises(KeyFileError) as info:
        keyfile.load_private_key(path / "below-a-file")
    assert "cannot open" in message(info)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "empty"),
        ("   \n", "empty"),
        ("not base64 at all!", "not valid base64"),
        (PRIVATE_TEXT[:-4], "decodes to 30 bytes"),
        (base64.b64encode(bytes(33)).decode(), "decodes to 33 bytes"),
        (PRIVATE_TEXT + "\n" + PRIVATE_TEXT, "single line"),
        ("é" * 44, "not valid base64"),
    ],
)
def test_bad_key_text(content: str, expected: str) -> None:
    with pytest.raises(KeyFileError) as info:
        keyfile.load_public_key_text(content)
    assert expected in message(info)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"\xff\xfe garbage", "not base64 text"),
        (b"A" * (keyfile.MAX_KEY_FILE_BYTES + 1), "too large"),
        (b"QUJD\n", "decodes to 3 bytes"),
    ],
)
def test_bad_key_file_content(tmp_path: Path, content: bytes, expected: str) -> None:
    path = write(tmp_path / "client.key", content)
    with pytest.raises(KeyFileError) as info:
        keyfile.load_private_key(path)
    text = message(info)
    assert expected in text


def test_public_from_bad_private_text() -> None:
    with pytest.raises(KeyFileError, match="private key"):
        keyfile.public_from_private_text("short")


def test_write_private_key_creates_0600_and_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "new.key"
    old_umask = os.umask(0)
    try:
        keyfile.write_private_key(path, PRIVATE_TEXT)
    finally:
        os.umask(old_umask)
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_text() == PRIVATE_TEXT + "\n"
    assert keyfile.load_private_key(path) == base64.b64decode(PRIVATE_TEXT)
    with pytest.raises(KeyFileError) as info:
        keyfile.write_private_key(path, PRIVATE_TEXT)
    assert "already exists" in message(info)
    with pytest.raises(KeyFileError):
        keyfile.write_private_key(tmp_path / "bad.key", "not a key")
    assert not (tmp_path / "bad.key").exists()
    with pytest.raises(KeyFileError) as info:
        keyfile.write_private_key(tmp_path / "missing-dir" / "k", PRIVATE_TEXT)
    assert "cannot create" in message(info)
