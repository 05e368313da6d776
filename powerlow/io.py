"""The I/O path of the offloaded run: whole-bundle reads into aligned buffers, several in flight.

    reader = BundleReader(path, depth=8, o_direct=True)
    req = reader.submit(offset, [memoryview(slot_a), memoryview(slot_b)], priority=0)
    req.wait()                       # raises PowerlowError on an I/O error
    reader.close()

Each of ``depth`` reader threads keeps one ``os.preadv`` in flight; preadv releases the GIL, so the reads
overlap each other and the compute thread (measured on this VM's virtio disk: see README.offload.md).
One request reads a contiguous file range (adjacent bundles of a layer) scattered into several slot buffers.
Requests are served in priority order (0 = the compute thread is waiting; higher = read-ahead).

O_DIRECT keeps the model out of the page cache. Where the file system refuses it (tmpfs, some FUSE or
overlay mounts), the reader falls back to buffered reads and drops each range from the page cache right
after reading it (POSIX_FADV_DONTNEED), so a cgroup memory limit still holds.
"""
from __future__ import annotations

import errno
import heapq
import itertools
import os
import threading
import time

import numpy as np

from .errors import PowerlowError

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


class Request:
    """One contiguous read: ``nbytes`` at ``offset`` into ``bufs`` (memoryviews, in order).

    ``unaligned``: offset, length and buffer need not be 4 KiB-aligned; under O_DIRECT the reader thread reads
    the aligned range around it into its own bounce buffer and copies the asked part out."""
    __slots__ = ("offset", "bufs", "nbytes", "event", "error", "unaligned")

    def __init__(self, offset: int, bufs: list, unaligned=False):
        self.offset = offset
        self.bufs = bufs
        self.nbytes = sum(len(b) for b in bufs)
        self.event = threading.Event()
        self.error: str | None = None
        self.unaligned = unaligned

    def done(self) -> bool:
        return self.event.is_set()

    def wait(self) -> None:
        self.event.wait()
        if self.error:
            raise PowerlowError(self.error)


class BusyClock:
    """Wall time with at least one read in flight in any of the readers sharing it (the FFN bundles and the
    streamed attention share one disk: their throughput together is what a probe of that disk compares with)."""

    def __init__(self, now=time.perf_counter):
        self._now = now          # the time source (a test passes a fake one)
        self._lock = threading.Lock()
        self._in_flight = 0
        self._since = 0.0
        self._done = 0.0

    def enter(self) -> None:
        with self._lock:
            if self._in_flight == 0:
                self._since = self._now()
            self._in_flight += 1

    def leave(self) -> None:
        with self._lock:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._done += self._now() - self._since

    @property
    def seconds(self) -> float:
        with self._lock:
            return self._done + (self._now() - self._since if self._in_flight else 0.0)


class BundleReader:
    """A pool of ``depth`` reader threads over one file; counters for bytes, requests and busy time (its own
    BusyClock; ``clock``: another one shared with other readers, kept up to date too)."""

    def __init__(self, path, *, depth: int = 8, o_direct: bool = True, clock: BusyClock | None = None):
        self.path = str(path)
        self.fd, self.direct = open_direct(self.path, o_direct)
        self.size = os.fstat(self.fd).st_size
        self.depth = depth
        self._clocks = [BusyClock()] + ([clock] if clock is not None else [])
        self._heap: list = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        # counters (written under _cv)
        self.bytes_read = 0
        self.requests = 0
        self._threads = [threading.Thread(target=self._worker, name=f"powerlow-io-{i}", daemon=True) for i in range(depth)]
        for t in self._threads:
            t.start()

    @property
    def busy_seconds(self) -> float:
        """Wall time with at least one read in flight, including the busy period running now (a reader
        that never idles during a measurement would otherwise report none of it)."""
        return self._clocks[0].seconds

    def submit(self, offset: int, bufs: list, *, priority: int = 0, unaligned: bool = False) -> Request:
        req = Request(offset, bufs, unaligned and self.direct)
        if offset < 0 or offset + req.nbytes > self.size:
            raise PowerlowError(f"{self.path}: read of {req.nbytes} bytes at {offset} is past the end "
                                f"({self.size} bytes); re-convert the model")
        with self._cv:
            if self._closed:
                raise PowerlowError("the I/O reader is closed")
            heapq.heappush(self._heap, (priority, next(self._seq), req))
            self._cv.notify()
        return req

    def _worker(self) -> None:
        fd = self.fd
        bounce = None
        while True:
            with self._cv:
                while not self._heap and not self._closed:
                    self._cv.wait()
                if self._closed and not self._heap:
                    return
                _, _, req = heapq.heappop(self._heap)
            for c in self._clocks:
                c.enter()
            err = None
            try:
                if req.unaligned:
                    bounce = self._read_bounced(req, bounce)
                else:
                    _pread_full(fd, req.bufs, req.offset, req.nbytes)
                    if not self.direct:
                        os.posix_fadvise(fd, req.offset, req.nbytes, os.POSIX_FADV_DONTNEED)
            except OSError as e:
                err = f"{self.path}: read of {req.nbytes} bytes at {req.offset} failed ({e.strerror or e}); check the disk"
            for c in self._clocks:
                c.leave()
            with self._cv:
                if err is None:
                    self.bytes_read += req.nbytes
                    self.requests += 1
            req.error = err

            req.event.set()

    def _read_bounced(self, req: Request, bounce):
        """O_DIRECT read of the aligned range around an unaligned request, copied into its buffers."""
        a = req.offset // ALIGN * ALIGN
        b = min(-(-(req.offset + req.nbytes) // ALIGN) * ALIGN, -(-self.size // ALIGN) * ALIGN)
        if bounce is None or len(bounce) < b - a:
            bounce = aligned_buffer(b - a)
        view = memoryview(bounce)[: b - a]
        _pread_full(self.fd, [view], a, req.offset + req.nbytes - a)   # the file's end may cut the last block
        pos = req.offset - a
        for buf in req.bufs:
            buf[:] = view[pos: pos + len(buf)]
            pos += len(buf)
        return bounce

    def close(self) -> None:
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._heap.clear()
            self._cv.notify_all()
        for t in self._threads:
            t.join()
        os.close(self.fd)


def _pread_full(fd: int, bufs: list, offset: int, need: int) -> int:
    """preadv into ``bufs`` at ``offset`` until at least ``need`` bytes arrived (short reads continue where
    they stopped; a read past the end of the file may stop short of the buffers' length)."""
    total = sum(len(b) for b in bufs)
    done, cur = 0, bufs
    while done < need:
        n = os.preadv(fd, cur, offset + done)
        if n <= 0:
            raise OSError(errno.EIO, "unexpected end of file")
        done += n
        if done < total:
            cur = _advance(bufs, done)
    return done


def _advance(bufs: list, n: int) -> list:
    """The part of the scatter list ``bufs`` after its first ``n`` bytes."""
    out = []
    for b in bufs:
        if n >= len(b):
            n -= len(b)
            continue
        out.append(b[n:])
        n = 0
    return out


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
    reader = BundleReader(path, depth=depth, o_direct=o_direct)
    bufs = [aligned_buffer(block_bytes) for _ in range(depth * 2)]
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    reqs: list[Request] = []
    i = 0
    try:
        while time.perf_counter() - t0 < seconds:
            while len(reqs) < depth * 2:
                off = int(rng.integers(n_blocks)) * block_bytes
                reqs.append(reader.submit(off, [memoryview(bufs[i % len(bufs)])]))
                i += 1
            reqs.pop(0).wait()
        for r in reqs:
            r.wait()
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
