"""Give large message buffers back to the system as soon as they are freed.

glibc's malloc serves an allocation above its mmap threshold (128 KiB at start) with its
own mmap and unmaps it on free. But each such free raises the threshold to the freed size
(up to 32 MiB): after the first 10 MB message, 10 MB buffers come from the heap, whose
freed space is kept (and fragments between worker threads' arenas), so the process's
resident memory grows by several message sizes. Setting the threshold explicitly turns
that adjustment off: a 10 MB message's buffers are mapped and unmapped again, and peak RSS
stays near what the message really needs (bench_smtp's 10 MB row).

The threshold sits above the 256 KiB buffers of the TLS layer: uvloop's SSLProtocol allocates
one per connection and ``SSLObject.read(256 KiB)`` one per TLS record received (then shrinks
it). At exactly 256 KiB each of those was an mmap, an mremap and a munmap with their page
faults, about a dozen per STARTTLS connection: a third of a millisecond of system time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

#: glibc's mallopt parameter number for the mmap threshold.
_M_MMAP_THRESHOLD = -3
#: Buffers from this size on are mapped: a large message's data, never the small objects of a
#: 2 KB message nor the TLS layer's 256 KiB read buffers (TLS_READ_BUFFER_BYTES).
MMAP_THRESHOLD_BYTES = 512 * 1024
#: What uvloop (SSL_READ_MAX_SIZE) and asyncio's sslproto ask ``SSLObject.read`` for.
TLS_READ_BUFFER_BYTES = 256 * 1024


def release_large_buffers_promptly(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix malloc's mmap threshold (glibc); ``False`` where there is no ``mallopt``."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))


#: The cyclic collector's first-generation threshold (CPython's default: 700). A message's
#: objects are freed by reference counting (server.py drops what a closed connection's
#: objects form cycles with); with the default, the net growth of the in-flight sessions'
#: objects still started a collection every dozen messages, and every few thousand messages
#: a full one over the whole heap (about 35 ms each): together ~45 µs per message, one
#: connection per message.
GC_THRESHOLD = 5000


def settle_heap(threshold: int = GC_THRESHOLD) -> None:
    """Once the service has started: move everything alive (modules, settings, caches) out
    of the collector's generations (``gc.freeze``), so a full collection no longer walks
    them, and raise the first generation's threshold. Garbage cycles are still collected,
    every ``threshold`` net allocations instead of 700."""
    gc.collect()
    gc.freeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(threshold, second, third)
