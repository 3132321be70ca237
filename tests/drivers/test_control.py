"""The control socket: a real unix socket in tmp_path, JSON lines in and out.

Determinism rules: every test runs under ``fail_after``.  Tests about
timeouts use ``autojump_clock`` and assert exact virtual times (a local
unix socket has its bytes in the kernel before the sender returns, so the
clock only jumps when both sides are really waiting).  No test sleeps.
"""

from __future__ import annotations

import functools
import json
import socket as stdlib_socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from jvpn_trio.drivers import control
from jvpn_trio.drivers.control import (
    DIR_MODE,
    MAX_REQUEST_BYTES,
    SOCKET_MODE,
    STATUS_REQUEST,
    ControlAccess,
    ControlError,
    JsonObject,
    command_handler,
    query_control,
    serve_control,
)

IO_TIMEOUT_S = 10.0
STATUS_REPLY = {"role": "client", "state": "ATTACHED", "version": 3, "srtt_ms": 12.5, "pinned": None}


def status_handler() -> control.Handler:
    return command_handler({"status": lambda _request: dict(STATUS_REPLY)})


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "run" / "ctl.sock"


@pytest.fixture
async def server(sock_path: Path) -> AsyncIterator[Path]:
    """A control server on ``sock_path`` for the test's duration."""
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(serve_control, sock_path, status_handler(), access=ControlAccess(group=None)))
        yield sock_path
        nursery.cancel_scope.cancel()


async def open_raw(path: Path) -> trio.SocketStream:
    return await trio.open_unix_socket(str(path))


async def read_line(stream: trio.SocketStream) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        data += chunk
    return data


def make_stale_socket_file(path: Path) -> None:
    """A socket file whose server is gone: bound, never listening, closed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM) as s:
        s.bind(str(path))
    assert stat.S_ISSOCK(path.lstat().st_mode)


# -- serving --------------------------------------------------------------------------


async def test_status_request_is_answered(server: Path) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        reply = await query_control(server, STATUS_REQUEST, timeout=5.0)
    assert reply == STATUS_REPLY


async def test_one_connection_carries_several_requests_and_malformed_lines_get_errors(server: Path) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        stream = await open_raw(server)
        async with stream:
            await stream.send_all(b"not json\n")
            bad = json.loads(await read_line(stream))
            await stream.send_all(b"[1, 2]\n")
            not_object = json.loads(await read_line(stream))
            await stream.send_all(b"\xff\xfe\n")
            not_utf8 = json.loads(await read_line(stream))
            await stream.send_all(b"[" * 60000 + b"\n")
            too_deep = json.loads(await read_line(stream))
            await stream.send_all(b'{"cmd": "status"}\n')
            good = json.loads(await read_line(stream))
    assert set(bad) == {"error"} and bad["error"].startswith("malformed request: ")
    assert not_object == {"error": "malformed request: expected a JSON object, got list"}
    assert set(not_utf8) == {"error"} and not_utf8["error"].startswith("malformed request: ")
    assert too_deep == {"error": "malformed request: nested too deeply"}
    assert good == STATUS_REPLY


async def test_replies_are_single_sorted_compact_lines(server: Path) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        stream = await open_raw(server)
        async with stream:
            await stream.send_all(b'{"cmd":"status"}\n')
            line = await read_line(stream)
    assert line == json.dumps(STATUS_REPLY, sort_keys=True, separators=(",", ":")).encode() + b"\n"


async def test_oversized_request_gets_an_error_and_the_connection_closes(server: Path) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        stream = await open_raw(server)
        async with stream:
            payload = b'{"cmd":"status","pad":"' + b"x" * MAX_REQUEST_BYTES + b'"}\n'
            try:
                await stream.send_all(payload)
            except trio.BrokenResourceError:
                pass  # the server may close before it has read it all: that is the point
            reply = json.loads(await read_line(stream))
            assert await stream.receive_some(100) == b""
    assert reply == {"error": f"request exceeds {MAX_REQUEST_BYTES} bytes"}


async def test_request_at_the_size_limit_is_accepted(server: Path) -> None:
    request = {"cmd": "status", "pad": ""}
    request["pad"] = "x" * (MAX_REQUEST_BYTES - len(json.dumps(request, separators=(",", ":"))))
    with trio.fail_after(IO_TIMEOUT_S):
        reply = await query_control(server, request, timeout=5.0)
    assert reply == STATUS_REPLY


async def test_final_unterminated_line_is_answered(server: Path) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        stream = await open_raw(server)
        async with stream:
            await stream.send_all(b'{"cmd":"status"}')
            await stream.send_eof()
            reply = json.loads(await read_line(stream))
    assert reply == STATUS_REPLY


async def test_socket_is_owner_only_in_a_private_directory(server: Path) -> None:
    assert stat.S_ISSOCK(server.lstat().st_mode)
    assert stat.S_IMODE(server.lstat().st_mode) == SOCKET_MODE
    assert stat.S_IMODE(server.parent.stat().st_mode) == DIR_MODE


async def test_socket_file_is_removed_on_exit(sock_path: Path) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, sock_path, status_handler())
            assert sock_path.exists()
            nursery.cancel_scope.cancel()
    assert not sock_path.exists()


async def test_stale_socket_file_is_replaced(sock_path: Path) -> None:
    make_stale_socket_file(sock_path)
    with trio.fail_after(IO_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, sock_path, status_handler())
            assert await query_control(sock_path, STATUS_REQUEST, timeout=5.0) == STATUS_REPLY
            nursery.cancel_scope.cancel()


async def test_second_instance_is_refused_and_the_first_keeps_serving(server: Path) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            with pytest.raises(ControlError) as info:
                await nursery.start(serve_control, server, status_handler())
        assert str(info.value) == f"another instance is running at {server}"
        assert await query_control(server, STATUS_REQUEST, timeout=5.0) == STATUS_REPLY


async def test_a_path_that_is_not_a_socket_is_never_replaced(sock_path: Path) -> None:
    sock_path.parent.mkdir(parents=True)
    sock_path.write_text("precious")
    with trio.fail_after(IO_TIMEOUT_S):
        with pytest.raises(ControlError, match="exists and is not a socket"):
            await serve_control(sock_path, status_handler())
    assert sock_path.read_text() == "precious"


async def test_handler_refusals_and_unknown_commands_become_error_replies(server: Path) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        with pytest.raises(ControlError) as unknown:
            await query_control(server, {"cmd": "reboot"}, timeout=5.0)
        with pytest.raises(ControlError) as missing:
            await query_control(server, {"verb": "status"}, timeout=5.0)
    assert str(unknown.value) == f"{server}: unknown command 'reboot' (known: status)"
    assert str(missing.value) == f'{server}: request needs "cmd" (a string)'


async def test_async_handlers_and_bad_replies(sock_path: Path) -> None:
    async def slow_status(_request: JsonObject) -> JsonObject:
        await trio.sleep(0)
        return {"ok": True}

    def not_json(_request: JsonObject) -> JsonObject:
        return {"value": float("nan")}

    handler = command_handler({"status": slow_status, "nan": not_json})
    with trio.fail_after(IO_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, sock_path, handler)
            assert await query_control(sock_path, STATUS_REQUEST, timeout=5.0) == {"ok": True}
            with pytest.raises(ControlError, match="internal error: reply is not JSON"):
                await query_control(sock_path, {"cmd": "nan"}, timeout=5.0)
            nursery.cancel_scope.cancel()


async def test_connections_beyond_the_limit_are_told_busy(sock_path: Path) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: serve_control(
                    sock_path, status_handler(), max_connections=1, task_status=task_status
                )
            )
            first = await open_raw(sock_path)
            async with first:
                await first.send_all(b'{"cmd":"status"}\n')
                assert json.loads(await read_line(first)) == STATUS_REPLY  # it holds the only slot
                with pytest.raises(ControlError, match="busy: too many control connections"):
                    await query_control(sock_path, STATUS_REQUEST, timeout=5.0)
            nursery.cancel_scope.cancel()


async def test_silent_client_is_disconnected_after_the_request_timeout(
    sock_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: serve_control(
                    sock_path, status_handler(), request_timeout_s=2.0, task_status=task_status
                )
            )
            stream = await open_raw(sock_path)
            async with stream:
                start = trio.current_time()
                assert await stream.receive_some(100) == b""
                assert trio.current_time() == start + 2.0
            nursery.cancel_scope.cancel()


# -- query errors -----------------------------------------------------------------------


async def test_query_without_a_socket_says_nothing_is_running(sock_path: Path) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        with pytest.raises(ControlError) as info:
            await query_control(sock_path, STATUS_REQUEST, timeout=1.0)
    assert str(info.value) == f"no jvpn-trio running at {sock_path} (socket missing)"


async def test_query_against_a_stale_socket_says_refused(sock_path: Path) -> None:
    make_stale_socket_file(sock_path)
    with trio.fail_after(IO_TIMEOUT_S):
        with pytest.raises(ControlError) as info:
            await query_control(sock_path, STATUS_REQUEST, timeout=1.0)
    assert str(info.value) == f"connection refused at {sock_path} (stale socket?)"


async def test_query_without_permission_says_run_as_root(
    sock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Root may connect to any socket, so the kernel's EACCES is simulated.
    async def denied(_filename: str) -> trio.SocketStream:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(trio, "open_unix_socket", denied)
    with pytest.raises(ControlError) as info:
        await query_control(sock_path, STATUS_REQUEST, timeout=1.0)
    assert str(info.value) == f"permission denied at {sock_path} (run as root)"


async def test_query_times_out_on_a_handler_that_never_answers(
    sock_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async def hang(_request: JsonObject) -> JsonObject:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    with trio.fail_after(IO_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, sock_path, hang)
            start = trio.current_time()
            with pytest.raises(ControlError) as info:
                await query_control(sock_path, STATUS_REQUEST, timeout=1.5)
            assert trio.current_time() == start + 1.5
            nursery.cancel_scope.cancel()
    assert str(info.value) == f"no reply from {sock_path} within 1.5 s (timed out)"


async def test_query_reports_a_peer_that_closes_without_replying(sock_path: Path) -> None:
    sock_path.parent.mkdir(parents=True)
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await listener.bind(str(sock_path))
    listener.listen(1)

    async def accept_and_close() -> None:
        conn, _ = await listener.accept()
        conn.close()

    with trio.fail_after(IO_TIMEOUT_S), listener:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept_and_close)
            with pytest.raises(ControlError) as info:
                await query_control(sock_path, STATUS_REQUEST, timeout=5.0)
    assert str(info.value) in (
        f"{sock_path} closed the connection without replying",
        f"connection to {sock_path} broke",
    )


async def test_unencodable_request_is_a_caller_bug(sock_path: Path) -> None:
    bad: dict[str, Any] = {"cmd": object()}
    with pytest.raises(TypeError):
        await query_control(sock_path, bad, timeout=1.0)
