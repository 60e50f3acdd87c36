"""What a STARTTLS connection costs besides the handshake itself.

- The TLS layer's 256 KiB read buffers (uvloop's per connection, ``SSLObject.read``'s per
  record) come from malloc's heap, not from an mmap/munmap pair each: memory.py's mmap
  threshold is above them, while a 10 MB message's buffers are still mapped.
- The server issues one TLS 1.3 session ticket per handshake, as Postfix does, not
  OpenSSL's default two (each is encrypted, serialised and sent).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import platform
import ssl

import pytest
from mailgate_smtp_ingest.memory import (
    MMAP_THRESHOLD_BYTES,
    TLS_READ_BUFFER_BYTES,
    release_large_buffers_promptly,
)
from mailgate_smtp_ingest.tls import context_from_pem, self_signed_pair

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _mapped_chunks() -> int:
    """How many live allocations malloc serves with their own mmap."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
    mallinfo2 = libc.mallinfo2
    mallinfo2.restype = _MallInfo2
    return int(mallinfo2().hblks)


def _handshake(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    session: ssl.SSLSession | None = None,
) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.SSLObject, ssl.MemoryBIO]:
    """A server and a client SSLObject after a handshake in memory (tickets received)."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost", session=session)
    for _ in range(10):
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if server.version() and not s_out.pending and not c_out.pending:
            break
    with contextlib.suppress(ssl.SSLWantReadError):
        client.read(1)  # takes in the session tickets
    return server, s_in, client, c_out


def _contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    cert_pem, key_pem = self_signed_pair("localhost")
    return context_from_pem(cert_pem, key_pem), ssl.create_default_context(cadata=cert_pem.decode())


def _tls_pair() -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.SSLObject, ssl.MemoryBIO]:
    return _handshake(*_contexts())


@glibc_only
def test_tls_record_reads_are_served_from_the_heap_and_big_buffers_are_mapped() -> None:
    assert release_large_buffers_promptly()
    server, s_in, client, c_out = _tls_pair()
    client.write(b"EHLO client.example\r\n")
    s_in.write(c_out.read())
    before = _mapped_chunks()
    line = server.read(TLS_READ_BUFFER_BYTES)  # as uvloop reads every record
    assert line == b"EHLO client.example\r\n"
    assert _mapped_chunks() == before  # a mapped read buffer would stay mapped, shrunk
    # Many at once, as busy connections hold them: more than the heap's free space, so
    # malloc must grow the heap (below the threshold) or map each one (at or above it).
    buffers = [bytes(TLS_READ_BUFFER_BYTES) for _ in range(64)]
    assert _mapped_chunks() == before
    message = bytearray(4 * MMAP_THRESHOLD_BYTES)  # message data: mapped, unmapped on free
    assert _mapped_chunks() == before + 1
    del message, buffers


def test_one_session_ticket_per_handshake_and_resumption_still_works() -> None:
    server_ctx, client_ctx = _contexts()
    assert server_ctx.num_tickets == 1
    assert server_ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    server, _, client, _ = _handshake(server_ctx, client_ctx)
    assert (server.version(), client.version()) == ("TLSv1.3", "TLSv1.3")
    assert client.session is not None and client.session.has_ticket
    again, _, resumed, _ = _handshake(server_ctx, client_ctx, session=client.session)
    assert resumed.session_reused and again.session_reused
