"""File access of the offloaded run: aligned buffers, O_DIRECT with a buffered fallback, and the range reader.

    reader = RangeReader(path, depth=4, groups=2)
    reader.read(offset, buf, 0, nbytes, group=0)     # queued; C reader threads, no GIL
    reader.wait(0)                                   # raises PowerlowError on an I/O error
    reader.close()

The FFN bundles go through the streaming core's slot cache and dense window (powerlow.cache, cython_ext/plk_io.c);
RangeReader is the same core with no slots, for byte ranges at any offset: the weight ring's streamed attention
and lm_head (powerlow.stream) and the disk probe below. Requests are served in priority order (0 first).

O_DIRECT keeps the model out of the page cache. Where the file system refuses it (tmpfs, some FUSE or
overlay mounts), the reader falls back to buffered reads and drops each range from the page cache right
after reading it (POSIX_FADV_DONTNEED), so a cgroup memory limit still holds.
"""
from __future__ import annotations

import errno
import os
import time

import numpy as np

from .errors import PowerlowError, extension

ALIGN = 4096


def aligned_buffer(nbytes: int, align: int = ALIGN) -> np.ndarray:
    """A uint8 array whose data pointer and length are ``align``-aligned (what O_DIRECT wants)."""
    nbytes = -(-nbytes // align) * align
    raw = np.empty(nbytes + align, dtype=np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start: start + nbytes]


def open_direct(path, o_direct: bool = True) -> tuple[int, bool]:
    """Open ``path`` for reading -> (fd, direct). Tries O_DIRECT (and a probe read) first when asked."""
    if o_direct and hasattr(os, "O_DIRECT"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise PowerlowError(f"cannot open {path}: {e.strerror}") from None
        else:
            buf = aligned_buffer(ALIGN)
            try:
                os.preadv(fd, [memoryview(buf)], 0)
                return fd, True
            except OSError:
                os.close(fd)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise PowerlowError(f"cannot open {path}: {e.strerror}") from None
    try:    # buffered: no read-ahead past the requests (those pages would stay in the page cache)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    except (AttributeError, OSError):
        pass
    return fd, False


class RangeReader:
    """Reader threads over one file for byte ranges into caller memory, in C (powerlow._iocore.RangeReader: the
    streaming core with no slots; the threads never take the GIL).

    ``read(offset, dest, at, nbytes, group)`` queues a read into dest[at:at + nbytes]; ``wait(group)`` returns once
    the group's reads have landed, or raises PowerlowError naming the file and the failed read. ``groups``: how
    many completion groups (the weight ring: one per slot); ``ranges``: reads outstanding at once. Counters
    ``bytes_read``, ``requests``, ``busy_seconds`` (its own clock; ``clock``: an _iocore.Clock it also keeps)."""

    def __init__(self, path, *, depth: int = 4, o_direct: bool = True, groups: int = 1, ranges: int = 64,
                 clock=None):
        _Core = extension("_iocore").RangeReader
        self.path = str(path)
        self.fd, self.direct = open_direct(self.path, o_direct)
        self.size = os.fstat(self.fd).st_size
        self.depth = depth
        self._core = _Core(self.fd, self.direct, depth, ranges, groups, clock)

    def read(self, offset: int, dest: np.ndarray, at: int, nbytes: int, group: int, priority: int = 0) -> None:
        if offset < 0 or offset + nbytes > self.size:
            raise PowerlowError(f"{self.path}: read of {nbytes} bytes at {offset} is past the end ({self.size} "
                                "bytes); re-convert the model")
        if self._core.read(offset, dest, at, nbytes, group, priority) < 0:
            raise PowerlowError("internal: more range reads outstanding than the reader was made for")

    def wait(self, group: int) -> None:
        if self._core.wait(group) < 0:
            _, _, _, err_no, offset, nbytes = self._core.error()
            why = os.strerror(err_no) if err_no else "unexpected end of file"
            raise PowerlowError(f"{self.path}: read of {nbytes} bytes at {offset} failed ({why}); check the disk")

    def inject_failure(self, after: int, err_no: int) -> None:
        """Tests: after ``after`` more successful reads every read fails with ``err_no``."""
        self._core.inject_failure(after, err_no)

    @property
    def bytes_read(self) -> int:
        return self._core.stats()["bytes_read"]

    @property
    def requests(self) -> int:
        return self._core.stats()["requests"]

    @property
    def busy_seconds(self) -> float:
        """Wall time with at least one read in flight, including the busy period running now."""
        return self._core.stats()["busy_seconds"]

    def close(self) -> None:
        if getattr(self, "_core", None) is not None:
            self._core.close()
            self._core = None
            os.close(self.fd)

    __del__ = close      # dropped unclosed: the threads stop (each finishing its read) before the fd closes


def probe_random_read(path, *, block_bytes: int, depth: int, seconds: float = 2.0, o_direct: bool = True,
                      seed: int = 0) -> dict:
    """Random aligned reads of ``block_bytes`` over ``path`` with ``depth`` in flight -> {"gbps", "direct", ...}.

    The reference the offloaded run's bundle reads are compared against (same block size and depth).
    With O_DIRECT the page cache is bypassed; without it, the result may come from RAM.
    """
    fd, direct = open_direct(path, o_direct)
    size = os.fstat(fd).st_size
    os.close(fd)
    n_blocks = size // block_bytes
    if n_blocks < 1:
        raise PowerlowError(f"{path} is smaller than one {block_bytes}-byte block; probe a bigger file")
    slots = depth * 2
    reader = RangeReader(path, depth=depth, o_direct=o_direct, groups=slots, ranges=slots)
    bufs = [aligned_buffer(block_bytes) for _ in range(slots)]
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    i = 0
    try:
        for g in range(slots):                   # depth * 2 in flight; each slot read again as it lands
            reader.read(int(rng.integers(n_blocks)) * block_bytes, bufs[g], 0, block_bytes, g)
        while time.perf_counter() - t0 < seconds:
            g = i % slots
            reader.wait(g)
            reader.read(int(rng.integers(n_blocks)) * block_bytes, bufs[g], 0, block_bytes, g)
            i += 1
        for g in range(slots):
            reader.wait(g)
        wall = time.perf_counter() - t0
        return {"gbps": reader.bytes_read / wall / 1e9, "block_bytes": block_bytes, "depth": depth,
                "direct": reader.direct, "bytes": reader.bytes_read, "seconds": round(wall, 3)}
    finally:
        reader.close()


def drop_page_cache(path) -> None:
    """Tell the kernel it may forget ``path``'s cached pages (after reading the resident files once)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except (AttributeError, OSError):
        pass
    finally:
        os.close(fd)
