"""The test harness's nats-server survives losing a port race (tests/fakes infra.py)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from mailgate_fakes import infra
from mailgate_fakes.infra import NatsServer


def test_a_picked_port_taken_before_the_bind_is_picked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    picks = iter([busy])
    real = infra.free_port
    monkeypatch.setattr(infra, "free_port", lambda: next(picks, None) or real())
    server = NatsServer(tmp_path / "nats")
    try:
        server.start()
        assert server.port != busy
        assert b"address already in use" in (tmp_path / "nats" / "nats.log").read_bytes()
        with socket.create_connection(("127.0.0.1", server.port), timeout=2) as conn:
            assert conn.recv(4).startswith(b"INFO")
    finally:
        server.stop()
        taken.close()


def test_ports_answered_by_another_process_are_not_mistaken_for_a_ready_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both picked ports are taken and answer connections: the dead nats-server must not
    count as started because something listens where it should have."""
    taken = [socket.socket(), socket.socket()]
    for sock in taken:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
    busy = [sock.getsockname()[1] for sock in taken]
    picks = iter(busy)
    real = infra.free_port
    monkeypatch.setattr(infra, "free_port", lambda: next(picks, None) or real())
    server = NatsServer(tmp_path / "nats")
    try:
        server.start()
        assert server.port not in busy and server.monitor_port not in busy
        assert server.proc is not None and server.proc.poll() is None
        with socket.create_connection(("127.0.0.1", server.port), timeout=2) as conn:
            assert conn.recv(4).startswith(b"INFO")
    finally:
        server.stop()
        for sock in taken:
            sock.close()


def test_a_fixed_port_that_is_taken_still_fails(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        server = NatsServer(tmp_path / "nats", port=taken.getsockname()[1])
        with pytest.raises(RuntimeError, match="process exited"):
            server.start()
        server.stop()
    finally:
        taken.close()
