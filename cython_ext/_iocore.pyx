# cython: language_level=3, boundscheck=False, wraparound=False
"""powerlow._iocore: the streaming core of an offloaded run in C (cython_ext/plk_io.c), driven by powerlow.cache.

SlotCore holds no Python state on the hot path: one ``fetch`` a layer (GIL released while it waits), reader
threads that never take the GIL. Its tables are numpy arrays the caller made (see powerlow.cache)."""
cimport cython
cimport numpy as cnp
from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint32_t, uint64_t

cnp.import_array()

cdef extern from "plk_io.h" nogil:
    ctypedef struct plk_clock:
        pass
    void plk_clock_init(plk_clock *c)
    void plk_clock_enter(plk_clock *c)
    void plk_clock_leave(plk_clock *c)
    double plk_clock_seconds(plk_clock *c)

    ctypedef struct plk_io_conf:
        int fd, direct
        uint8_t *arena
        int64_t n_slots, stride
        int L, N
        const int64_t *layer_off
        const int64_t *lstride
        int per_read, n_threads, policy
        const uint32_t *sums
        int check_every
        plk_clock *shared
        int32_t *slot_of
        int32_t *key
        int8_t *state
        int64_t *lock
        uint8_t *pending
        uint8_t *fresh
        uint8_t *pinned
        int64_t *last_used
        int64_t *loaded_at
        int64_t *freq
        uint8_t *verified
        int n_ranges, n_groups

    ctypedef struct plk_io_stats:
        int64_t hits, misses, demand_misses, evictions, wasted, unpinned, passes
        int64_t bytes_read, requests, checks
        double wait_seconds, busy_seconds

    ctypedef struct plk_io_error:
        int kind, layer, cluster, err_no
        int64_t offset, nbytes

    ctypedef struct plk_io:
        pass
    plk_io *plk_io_new(const plk_io_conf *conf)
    void plk_io_free(plk_io *io)
    int plk_io_live_readers()
    int plk_io_fetch(plk_io *io, int layer, const int32_t *ids, int n, uint64_t *out, int dense, int depth)
    int plk_io_prefetch(plk_io *io, int layer, const int32_t *ids, int n, int priority)
    int plk_io_pin(plk_io *io, int layer, const int32_t *ids, int n)
    int plk_io_wait_all(plk_io *io)
    void plk_io_stats_get(plk_io *io, plk_io_stats *st)
    void plk_io_last_error(plk_io *io, plk_io_error *err)
    void plk_io_count(plk_io *io, int64_t hits, int64_t misses, int passes)
    void plk_io_inject(plk_io *io, int64_t after, int err_no)
    void plk_io_inject_delay(plk_io *io, int64_t usec)
    int plk_io_range(plk_io *io, int64_t offset, int64_t nbytes, uint8_t *dest, int group, int priority)
    int plk_io_wait_group(plk_io *io, int group)

    ctypedef struct plk_stream:
        int W
        const int32_t *win
        int64_t cycle
        const int32_t *item_layer
        const int32_t *item_id
        const int64_t *layer_base
        const int64_t *before
        const int32_t *free_pos
        uint64_t *addr
    int plk_io_stream_begin(plk_io *io, const plk_stream *s)
    int plk_io_stream_piece(plk_io *io, int layer, int i0, int i1, const uint64_t **addr)

    ctypedef struct plk_io_api:
        int (*fetch)(plk_io *io, int layer, const int32_t *ids, int n, uint64_t *out, int dense, int depth)
        int (*prefetch)(plk_io *io, int layer, const int32_t *ids, int n, int priority)
        int (*stream_piece)(plk_io *io, int layer, int i0, int i1, const uint64_t **addr)
    const char *PLK_IO_API_NAME

cdef extern from "plk.h" nogil:
    void plk_crc32c_init()

from cpython.pycapsule cimport PyCapsule_New
from libc.string cimport memset

plk_crc32c_init()          # before any reader thread can use it

cdef plk_io_api _api
_api.fetch = plk_io_fetch
_api.prefetch = plk_io_prefetch
_api.stream_piece = plk_io_stream_piece
# the hot-path calls for powerlow._kernels.SparseStep (plk_io.h: plk_io_api), with SlotCore.handle
API = PyCapsule_New(<void *>&_api, PLK_IO_API_NAME, NULL)

POLICIES = {"lru": 0, "lfu": 1, "fifo": 2}
ERR_NONE, ERR_IO, ERR_EOF, ERR_CRC, ERR_SLOTS, ERR_ORDER = range(6)


cdef class Clock:
    """Wall time with at least one read in flight in any reader sharing it (C readers and Python ones alike)."""
    cdef plk_clock c

    def __cinit__(self):
        plk_clock_init(&self.c)

    def enter(self):
        plk_clock_enter(&self.c)

    def leave(self):
        plk_clock_leave(&self.c)

    @property
    def seconds(self) -> float:
        return plk_clock_seconds(&self.c)


cdef inline void *_ptr(cnp.ndarray a, dtype, n, name):
    if a.dtype != dtype or not a.flags.c_contiguous or a.size != n:
        raise ValueError(f"SlotCore: table {name} must be a C-contiguous {dtype} array of {n}")
    return cnp.PyArray_DATA(a)


def live_readers() -> int:
    """Reader threads running now, over every core in this process (tests: a dropped core's threads are gone)."""
    return plk_io_live_readers()


cdef class _Core:
    """One plk_io (reader threads over one open file): what SlotCore and RangeReader share.

    The reader threads write into memory the subclasses keep alive (SlotCore's arena and tables, RangeReader's
    destinations), so each subclass stops them in its own __dealloc__: Cython releases a subclass's attributes
    before it runs the base type's __dealloc__, and a read still in flight would land in freed memory (the heap
    corruption that aborted a CI run, 7 Dec 2026). no_gc_clear on the subclasses: the cycle collector must not
    release those attributes first either."""
    cdef plk_io *io

    def __dealloc__(self):
        self._stop()

    cdef void _stop(self) noexcept:
        """Stop the reader threads (each finishes the read it is serving) and free the core."""
        cdef plk_io *io = self.io
        self.io = NULL
        if io != NULL:
            with nogil:
                plk_io_free(io)

    def close(self):
        self._stop()

    cdef inline plk_io *_io(self) except NULL:
        if self.io == NULL:
            raise RuntimeError("the streaming core is closed")
        return self.io

    def inject_failure(self, int64_t after, int err_no):
        """Tests: after ``after`` more successful reads every read fails with ``err_no`` (after < 0: off)."""
        plk_io_inject(self._io(), after, err_no)

    def inject_delay(self, int64_t usec):
        """Tests: each reader thread sleeps usec with a request taken, before reading it (0: off)."""
        plk_io_inject_delay(self._io(), usec)

    def error(self) -> tuple:
        """(kind, layer, cluster, errno, offset, nbytes) of the first failure since the last call (kind 0: none;
        a range read's: layer -1, cluster = its group)."""
        cdef plk_io_error e
        plk_io_last_error(self._io(), &e)
        return (e.kind, e.layer, e.cluster, e.err_no, e.offset, e.nbytes)


@cython.no_gc_clear
cdef class SlotCore(_Core):
    """The slot table + request queue + reader threads over one open file (see plk_io.h)."""
    cdef object _keep
    cdef object _stream
    cdef cnp.ndarray _addr
    cdef int L_, N_
    cdef public int n_threads

    def __cinit__(self, int fd, bint direct, cnp.ndarray arena, int64_t stride, int L, int N,
                  cnp.ndarray layer_off, cnp.ndarray lstride, int per_read, int n_threads, str policy,
                  sums, bint check_every, Clock shared, dict tables):
        cdef plk_io_conf c
        n = arena.size // stride
        c.fd, c.direct = fd, direct
        c.arena = <uint8_t *>_ptr(arena, "uint8", n * stride, "arena")
        c.n_slots, c.stride, c.L, c.N = n, stride, L, N
        c.layer_off = <const int64_t *>_ptr(layer_off, "int64", L, "layer_off")
        c.lstride = <const int64_t *>_ptr(lstride, "int64", L, "lstride")
        c.per_read, c.n_threads, c.policy = per_read, n_threads, POLICIES[policy]
        c.sums = NULL if sums is None else <const uint32_t *>_ptr(sums, "uint32", L * N, "sums")
        c.check_every = check_every
        c.shared = NULL if shared is None else &shared.c
        t = tables
        c.slot_of = <int32_t *>_ptr(t["slot_of"], "int32", L * N, "slot_of")
        c.freq = <int64_t *>_ptr(t["freq"], "int64", L * N, "freq")
        c.verified = <uint8_t *>_ptr(t["verified"], "uint8", L * N, "verified")
        c.key = <int32_t *>_ptr(t["key"], "int32", n, "key")
        c.state = <int8_t *>_ptr(t["state"], "int8", n, "state")
        c.lock = <int64_t *>_ptr(t["lock"], "int64", n, "lock")
        c.pending = <uint8_t *>_ptr(t["pending"], "uint8", n, "pending")
        c.fresh = <uint8_t *>_ptr(t["fresh"], "uint8", n, "fresh")
        c.pinned = <uint8_t *>_ptr(t["pinned"], "uint8", n, "pinned")
        c.last_used = <int64_t *>_ptr(t["last_used"], "int64", n, "last_used")
        c.loaded_at = <int64_t *>_ptr(t["loaded_at"], "int64", n, "loaded_at")
        c.n_ranges, c.n_groups = 0, 0
        self._keep = (arena, layer_off, lstride, sums, shared, tables)
        self._stream = None
        self.L_, self.N_ = L, N
        self.n_threads = n_threads
        self.io = plk_io_new(&c)
        if self.io == NULL:
            raise MemoryError("the streaming core could not allocate its tables or start its reader threads")

    def __dealloc__(self):
        self._stop()     # before Cython releases _keep (the arena and tables the readers write)

    @property
    def handle(self) -> int:
        """The plk_io pointer (0 once closed) for another extension's C calls through API; valid while this
        object is open (the caller keeps a reference and reads it again each call)."""
        return <size_t>self.io

    def fetch(self, int layer, cnp.ndarray ids, cnp.ndarray out, bint dense=False, int depth=1) -> int:
        """out[i] = address of bundle ids[i] (int32, increasing) of layer; 0, or -1 (see error())."""
        cdef plk_io *io = self._io()
        cdef const int32_t *p = <const int32_t *>cnp.PyArray_DATA(ids)
        cdef uint64_t *o = <uint64_t *>cnp.PyArray_DATA(out)
        cdef int n = ids.shape[0], r
        if ids.dtype.num != cnp.NPY_INT32 or out.dtype.num != cnp.NPY_UINT64 or out.shape[0] < n \
                or not ids.flags.c_contiguous:
            raise ValueError("fetch wants int32 ids and a uint64 out at least as long")
        with nogil:
            r = plk_io_fetch(io, layer, p, n, o, dense, depth)
        return r

    def prefetch(self, int layer, cnp.ndarray ids, int priority=1) -> int:
        cdef plk_io *io = self._io()
        if ids.dtype.num != cnp.NPY_INT32 or not ids.flags.c_contiguous:
            raise ValueError("prefetch wants int32 ids")
        return plk_io_prefetch(io, layer, <const int32_t *>cnp.PyArray_DATA(ids), ids.shape[0], priority)

    def pin(self, int layer, cnp.ndarray ids) -> int:
        cdef plk_io *io = self._io()
        if ids.dtype.num != cnp.NPY_INT32 or not ids.flags.c_contiguous:
            raise ValueError("pin wants int32 ids")
        return plk_io_pin(io, layer, <const int32_t *>cnp.PyArray_DATA(ids), ids.shape[0])

    def wait_all(self) -> int:
        cdef plk_io *io = self._io()
        cdef int r
        with nogil:
            r = plk_io_wait_all(io)
        return r

    def stream_begin(self, cnp.ndarray win, cnp.ndarray item_layer, cnp.ndarray item_id, cnp.ndarray layer_base,
                     cnp.ndarray before, cnp.ndarray free_pos, cnp.ndarray addr):
        """The dense window over these tables (plk_io.h: plk_stream; kept by this object) and its first reads."""
        cdef plk_io *io = self._io()
        cdef plk_stream st
        cdef int L = self.L_, N = self.N_
        st.W = win.size
        st.cycle = item_layer.size
        if st.W < 1 or item_id.size != st.cycle:
            raise ValueError("stream_begin: a window of >= 1 slots and one cluster id per item")
        st.win = <const int32_t *>_ptr(win, "int32", st.W, "win")
        st.item_layer = <const int32_t *>_ptr(item_layer, "int32", st.cycle, "item_layer")
        st.item_id = <const int32_t *>_ptr(item_id, "int32", st.cycle, "item_id")
        st.layer_base = <const int64_t *>_ptr(layer_base, "int64", L + 1, "layer_base")
        st.before = <const int64_t *>_ptr(before, "int64", L * (N + 1), "before")
        st.free_pos = <const int32_t *>_ptr(free_pos, "int32", L * N, "free_pos")
        st.addr = <uint64_t *>_ptr(addr, "uint64", L * N, "addr")
        self._stream = (win, item_layer, item_id, layer_base, before, free_pos, addr)
        self._addr = addr.reshape(L, N)
        if plk_io_stream_begin(io, &st) < 0:
            raise MemoryError("the streaming core could not allocate its window scratch")

    def stream_piece(self, int layer, int i0, int i1):
        """Addresses (uint64 view) of compute positions i0..i1 of layer once read, or None (a failed read:
        error()). See plk_io_stream_piece."""
        cdef plk_io *io = self._io()
        cdef const uint64_t *a
        cdef int r
        if self._stream is None or layer < 0 or layer >= self.L_ or not 0 <= i0 <= i1 <= self.N_:
            raise ValueError("stream_piece: no window, or positions out of range")
        with nogil:
            r = plk_io_stream_piece(io, layer, i0, i1, &a)
        if r < 0:
            return None
        return self._addr[layer, i0:i1]

    def count(self, int64_t hits, int64_t misses, int passes):
        plk_io_count(self._io(), hits, misses, passes)

    def stats(self) -> dict:
        cdef plk_io_stats s
        plk_io_stats_get(self._io(), &s)
        return {"hits": s.hits, "misses": s.misses, "demand_misses": s.demand_misses, "evictions": s.evictions,
                "wasted": s.wasted, "unpinned": s.unpinned, "passes": s.passes, "bytes_read": s.bytes_read,
                "requests": s.requests, "checks": s.checks, "wait_seconds": s.wait_seconds, "busy_seconds": s.busy_seconds}



@cython.no_gc_clear
cdef class RangeReader(_Core):
    """Reader threads (the same C core, no slots) for byte ranges of one file into caller memory: the weight
    ring's streamed tensors (powerlow.stream) and the disk probe (powerlow.io). Any offset and length; with O_DIRECT
    each reader thread reads the aligned span into its bounce buffer and copies. Reads count down a completion
    group; ``wait(group)`` blocks (GIL released) until the group's reads have landed."""
    cdef public int n_threads, n_groups
    cdef object _keep
    cdef list _dests      # per group: the destination arrays of its reads not yet waited for

    def __cinit__(self, int fd, bint direct, int n_threads, int n_ranges, int n_groups, Clock shared=None):
        cdef plk_io_conf c
        memset(&c, 0, sizeof(c))
        c.fd, c.direct, c.n_threads = fd, direct, n_threads
        c.per_read, c.n_ranges, c.n_groups = 1, n_ranges, n_groups
        c.shared = NULL if shared is None else &shared.c
        self._keep = shared
        self.n_threads, self.n_groups = n_threads, n_groups
        if n_threads < 1 or n_ranges < 1 or n_groups < 1:
            raise ValueError("RangeReader: at least one thread, one range request and one group")
        self._dests = [[] for _ in range(n_groups)]
        self.io = plk_io_new(&c)
        if self.io == NULL:
            raise MemoryError("the range reader could not allocate its tables or start its threads")

    def __dealloc__(self):
        self._stop()     # before Cython releases _dests and the shared clock (what the readers write)

    def read(self, int64_t offset, cnp.ndarray dest, int64_t at, int64_t nbytes, int group, int priority=0) -> int:
        """Queue a read of nbytes at offset into dest[at:at + nbytes] (a contiguous array: its bytes). dest is kept
        alive here until wait(group) returns or the reader is closed. 0, or -1 (no free request: wait a group
        first)."""
        cdef plk_io *io = self._io()
        cdef int r
        if not dest.flags.c_contiguous or at < 0 or nbytes < 1 or at + nbytes > dest.nbytes:
            raise ValueError("RangeReader.read: the range must lie inside a contiguous buffer")
        if not 0 <= group < self.n_groups:
            raise ValueError(f"RangeReader.read: group {group} is not in [0, {self.n_groups})")
        r = plk_io_range(io, offset, nbytes, <uint8_t *>cnp.PyArray_DATA(dest) + at, group, priority)
        if r == 0:
            self._dests[group].append(dest)
        return r

    def wait(self, int group) -> int:
        cdef plk_io *io = self._io()
        cdef int r
        if not 0 <= group < self.n_groups:
            raise ValueError(f"RangeReader.wait: group {group} is not in [0, {self.n_groups})")
        with nogil:
            r = plk_io_wait_group(io, group)
        self._dests[group].clear()    # every read of the group has landed (or failed)
        return r

    def close(self):
        self._stop()
        self._dests = [[] for _ in range(self.n_groups)]

    def stats(self) -> dict:
        cdef plk_io_stats s
        plk_io_stats_get(self._io(), &s)
        return {"bytes_read": s.bytes_read, "requests": s.requests, "wait_seconds": s.wait_seconds,
                "busy_seconds": s.busy_seconds}
