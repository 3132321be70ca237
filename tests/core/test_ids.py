"""ids: SessionId, PathId and Binding validate once and print short (spec 3.1, Property 1).

Determinism: explicit bytes; ``generate`` gets an injected byte source.
"""

from __future__ import annotations

import attrs
import pytest

from jvpn_trio.core.ids import MAX_PATH_ID, SESSION_ID_BYTES, Binding, PathId, SessionId

RAW = bytes(range(16))
HEX = "000102030405060708090a0b0c0d0e0f"


def test_constants() -> None:
    assert SESSION_ID_BYTES == 16
    assert MAX_PATH_ID == 255


def test_session_id_forms() -> None:
    sid = SessionId(RAW)
    assert sid.raw == RAW
    assert sid.hex == HEX
    assert sid.short == "00010203"
    assert str(sid) == HEX


@pytest.mark.parametrize("raw", [b"", bytes(15), bytes(17), bytearray(16), HEX, None, 16], ids=repr)
def test_session_id_must_be_16_bytes(raw: object) -> None:
    with pytest.raises(ValueError, match=r"^SessionId must be 16 bytes$"):
        SessionId(raw)  # type: ignore[arg-type]


def test_from_hex_round_trip() -> None:
    assert SessionId.from_hex(HEX) == SessionId(RAW)
    assert SessionId.from_hex(HEX.upper()) == SessionId(RAW)
    assert SessionId.from_hex(SessionId(RAW).hex) == SessionId(RAW)


@pytest.mark.parametrize("text", ["zz", "0", HEX[:-1] + "g", "0x" + HEX])
def test_from_hex_not_hex(text: str) -> None:
    with pytest.raises(ValueError) as info:
        SessionId.from_hex(text)
    assert str(info.value) == f"SessionId is not hex: {text!r}"


@pytest.mark.parametrize("text", ["", "00" * 15, "00" * 17])
def test_from_hex_wrong_length(text: str) -> None:
    with pytest.raises(ValueError, match=r"^SessionId must be 16 bytes$"):
        SessionId.from_hex(text)


def test_generate_asks_for_16_bytes() -> None:
    asked: list[int] = []

    def source(n: int) -> bytes:
        asked.append(n)
        return bytes([0xAB]) * n

    assert SessionId.generate(source) == SessionId(bytes([0xAB]) * 16)
    assert asked == [16]


def test_generate_rejects_a_short_source() -> None:
    with pytest.raises(ValueError, match=r"^SessionId must be 16 bytes$"):
        SessionId.generate(lambda n: bytes(n - 1))


def test_session_id_value_semantics() -> None:
    a, b = SessionId(RAW), SessionId(bytes(16))
    assert a == SessionId(bytes(RAW))
    assert hash(a) == hash(SessionId(RAW))
    assert b < a
    assert sorted([a, b]) == [b, a]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        a.raw = bytes(16)  # type: ignore[misc]


@pytest.mark.parametrize("value", [1, 2, 254, 255])
def test_path_id_range(value: int) -> None:
    assert PathId(value).value == value
    assert str(PathId(value)) == f"p{value}"


@pytest.mark.parametrize("value", [0, 256, -1, True, False, 1.0, "1", None], ids=repr)
def test_path_id_rejects(value: object) -> None:
    with pytest.raises(ValueError) as info:
        PathId(value)  # type: ignore[arg-type]
    assert str(info.value) == f"PathId must be an int in 1..255, got {value!r}"


def test_path_id_order() -> None:
    assert PathId(2) < PathId(10)
    assert sorted([PathId(3), PathId(1), PathId(2)]) == [PathId(1), PathId(2), PathId(3)]


def test_binding_str_and_equality() -> None:
    b = Binding(path=PathId(1), endpoint=("192.0.2.1", 51820))
    assert str(b) == "p1@192.0.2.1:51820"
    assert b == Binding(PathId(1), ("192.0.2.1", 51820))
    assert hash(b) == hash(Binding(PathId(1), ("192.0.2.1", 51820)))
    assert b != Binding(PathId(1), ("192.0.2.1", 51821))
    assert b != Binding(PathId(2), ("192.0.2.1", 51820))
    assert str(Binding(PathId(255), ("2001:db8::1", 1))) == "p255@2001:db8::1:1"
