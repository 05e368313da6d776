/* The streaming core: slot table, request queue, reader threads (see plk_io.h). */
#define _GNU_SOURCE
#include "plk_io.h"

#include <errno.h>
#include <stdatomic.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

uint32_t plk_crc32c(const void *p, size_t n, uint32_t crc);

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

void plk_clock_init(plk_clock *c) {
    pthread_mutex_init(&c->m, NULL);
    c->in_flight = 0;
    c->since = c->done = 0.0;
}

void plk_clock_enter(plk_clock *c) {
    pthread_mutex_lock(&c->m);
    if (c->in_flight++ == 0) c->since = now_s();
    pthread_mutex_unlock(&c->m);
}

void plk_clock_leave(plk_clock *c) {
    pthread_mutex_lock(&c->m);
    if (--c->in_flight == 0) c->done += now_s() - c->since;
    pthread_mutex_unlock(&c->m);
}

double plk_clock_seconds(plk_clock *c) {
    pthread_mutex_lock(&c->m);
    double s = c->done + (c->in_flight ? now_s() - c->since : 0.0);
    pthread_mutex_unlock(&c->m);
    return s;
}

typedef struct {
    int64_t offset;
    int layer, c0, n, priority, queued;
    uint64_t seq;
    int32_t *slots;               /* n slots, in the order of the bundles */
    int next_free;
    uint8_t *dest;                /* a range read (plk_io_range): its bytes go here; NULL for bundle reads */
    int64_t nbytes;
    int group;
} req_t;

struct plk_io {
    plk_io_conf c;
    pthread_mutex_t m;            /* the queue, the request pool, completions, the error */
    pthread_cond_t work, done;
    pthread_t *threads;
    int n_started, closing;
    req_t *reqs;
    int32_t *req_slots;           /* n_slots * per_read */
    int free_req, free_range;     /* the bundle requests' pool, the range requests' pool */
    int *group_pending;           /* [n_groups] range reads outstanding */
    uint8_t *group_failed;
    int *heap;
    int heap_n;
    uint64_t seq;
    int32_t *req_of;              /* [n] request a LOADING slot waits on */
    /* compute-thread scratch */
    int32_t *cand, *missing, *tmp, *all;   /* all: 0 .. N-1 */
    int64_t *score;
    uint32_t *mark;
    uint32_t mark_epoch;
    int64_t epoch, tick, next_pin;
    plk_io_stats st;              /* bytes_read / requests written under m */
    plk_clock own;
    plk_io_error err;
    int64_t fail_after;           /* fault injection: reads left before they fail (-1: never) */
    int fail_errno;
    int64_t delay_us;             /* tests: each reader sleeps this long with a request taken, before reading it */
    /* the dense window (plk_io_stream_*) */
    plk_stream win;
    int64_t issued, used, next;   /* stream positions (they only grow) */
    int32_t *wtmp;                /* [n_slots] */
};

/* -- the request queue (under m) ------------------------------------------------------------------------ */
static int req_less(const plk_io *io, int a, int b) {
    const req_t *x = &io->reqs[a], *y = &io->reqs[b];
    return x->priority != y->priority ? x->priority < y->priority : x->seq < y->seq;
}

static void sift_down(plk_io *io, int i) {
    int n = io->heap_n, *h = io->heap;
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && req_less(io, h[l], h[m])) m = l;
        if (r < n && req_less(io, h[r], h[m])) m = r;
        if (m == i) return;
        int t = h[i]; h[i] = h[m]; h[m] = t;
        i = m;
    }
}

static void heap_push(plk_io *io, int r) {
    int i = io->heap_n++, *h = io->heap;
    h[i] = r;
    while (i > 0) {
        int p = (i - 1) / 2;
        if (!req_less(io, h[i], h[p])) break;
        int t = h[i]; h[i] = h[p]; h[p] = t;
        i = p;
    }
}

static int heap_pop(plk_io *io) {
    int r = io->heap[0];
    io->heap[0] = io->heap[--io->heap_n];
    sift_down(io, 0);
    return r;
}

/* -- reader threads -------------------------------------------------------------------------------------- */
static int read_full(int fd, struct iovec *iov, int cnt, int64_t off, int64_t nbytes, int *err_no) {
    while (nbytes > 0) {
        ssize_t k = preadv(fd, iov, cnt, off);
        if (k < 0) {
            if (errno == EINTR) continue;
            *err_no = errno;
            return PLK_ERR_IO;
        }
        if (k == 0) return PLK_ERR_EOF;
        off += k;
        nbytes -= k;
        while (cnt && (size_t)k >= iov->iov_len) { k -= (ssize_t)iov->iov_len; iov++; cnt--; }
        if (cnt) { iov->iov_base = (uint8_t *)iov->iov_base + k; iov->iov_len -= (size_t)k; }
    }
    return PLK_ERR_NONE;
}

/* The CRC32C of the bundles of a read not checked yet in this run (every one with check_every). */
static int check_sums(plk_io *io, req_t *r, int *bad, int *checks) {
    const plk_io_conf *c = &io->c;
    for (int i = 0; i < r->n; i++) {
        int64_t k = (int64_t)r->layer * c->N + r->c0 + i;
        if (!c->check_every && __atomic_load_n(&c->verified[k], __ATOMIC_RELAXED)) continue;
        ++*checks;
        uint32_t got = plk_crc32c(c->arena + (int64_t)r->slots[i] * c->stride, (size_t)c->lstride[r->layer], 0);
        if (got != c->sums[k]) { *bad = r->c0 + i; return PLK_ERR_CRC; }
        __atomic_store_n(&c->verified[k], 1, __ATOMIC_RELAXED);
    }
    return PLK_ERR_NONE;
}

static void serve(plk_io *io, req_t *r, struct iovec *iov) {
    const plk_io_conf *c = &io->c;
    int64_t len = c->lstride[r->layer], nbytes = len * r->n;
    for (int i = 0; i < r->n; i++) {
        iov[i].iov_base = c->arena + (int64_t)r->slots[i] * c->stride;
        iov[i].iov_len = (size_t)len;
    }
    plk_clock_enter(&io->own);
    if (c->shared) plk_clock_enter(c->shared);
    int err_no = 0, bad = -1, checks = 0;
    int kind;
    if (__atomic_load_n(&io->fail_after, __ATOMIC_RELAXED) >= 0
        && __atomic_sub_fetch(&io->fail_after, 1, __ATOMIC_RELAXED) < 0) {
        __atomic_store_n(&io->fail_after, 0, __ATOMIC_RELAXED);   /* stays failing */
        kind = PLK_ERR_IO;
        err_no = io->fail_errno;
    } else {
        kind = read_full(c->fd, iov, r->n, r->offset, nbytes, &err_no);
    }
    if (kind == PLK_ERR_NONE && !c->direct) posix_fadvise(c->fd, r->offset, nbytes, POSIX_FADV_DONTNEED);
    if (kind == PLK_ERR_NONE && c->sums) kind = check_sums(io, r, &bad, &checks);
    if (c->shared) plk_clock_leave(c->shared);
    plk_clock_leave(&io->own);
    pthread_mutex_lock(&io->m);
    io->st.checks += checks;
    int8_t st = kind == PLK_ERR_NONE ? PLK_SLOT_READY : PLK_SLOT_FAILED;
    for (int i = 0; i < r->n; i++) __atomic_store_n(&c->state[r->slots[i]], st, __ATOMIC_RELEASE);
    if (kind == PLK_ERR_NONE) {
        io->st.bytes_read += nbytes;
        io->st.requests++;
    } else if (io->err.kind == PLK_ERR_NONE) {
        io->err = (plk_io_error){kind, r->layer, kind == PLK_ERR_CRC ? bad : r->c0, err_no,
                                 kind == PLK_ERR_CRC ? r->offset + (int64_t)(bad - r->c0) * len : r->offset,
                                 kind == PLK_ERR_CRC ? len : nbytes};
    }
    r->next_free = io->free_req;
    io->free_req = (int)(r - io->reqs);
    pthread_cond_broadcast(&io->done);
    pthread_mutex_unlock(&io->m);
}

/* A range read: straight into dest (buffered; the pages dropped after), or with O_DIRECT the aligned span around
 * it into the thread's bounce buffer, then copied. A span reaching past the end of the file may come back short. */
typedef struct { uint8_t *p; int64_t cap; } bounce_t;

static int read_range(plk_io *io, req_t *r, bounce_t *b, int *err_no) {
    const plk_io_conf *c = &io->c;
    if (!c->direct) {
        struct iovec v = {r->dest, (size_t)r->nbytes};
        int kind = read_full(c->fd, &v, 1, r->offset, r->nbytes, err_no);
        if (kind == PLK_ERR_NONE) posix_fadvise(c->fd, r->offset, r->nbytes, POSIX_FADV_DONTNEED);
        return kind;
    }
    int64_t a0 = r->offset & ~(int64_t)4095, a1 = (r->offset + r->nbytes + 4095) & ~(int64_t)4095;
    int64_t need = r->offset + r->nbytes - a0, got = 0;
    if (b->cap < a1 - a0) {
        free(b->p);
        b->p = NULL;
        b->cap = 0;
        if (posix_memalign((void **)&b->p, 4096, (size_t)(a1 - a0))) { *err_no = ENOMEM; return PLK_ERR_IO; }
        b->cap = a1 - a0;
    }
    while (got < need) {
        ssize_t k = pread(c->fd, b->p + got, (size_t)(a1 - a0 - got), a0 + got);
        if (k < 0) {
            if (errno == EINTR) continue;
            *err_no = errno;
            return PLK_ERR_IO;
        }
        if (k == 0) return PLK_ERR_EOF;
        got += k;
    }
    memcpy(r->dest, b->p + (r->offset - a0), (size_t)r->nbytes);
    return PLK_ERR_NONE;
}

static void serve_range(plk_io *io, req_t *r, bounce_t *b) {
    const plk_io_conf *c = &io->c;
    plk_clock_enter(&io->own);
    if (c->shared) plk_clock_enter(c->shared);
    int err_no = 0, kind;
    if (__atomic_load_n(&io->fail_after, __ATOMIC_RELAXED) >= 0
        && __atomic_sub_fetch(&io->fail_after, 1, __ATOMIC_RELAXED) < 0) {
        __atomic_store_n(&io->fail_after, 0, __ATOMIC_RELAXED);
        kind = PLK_ERR_IO;
        err_no = io->fail_errno;
    } else {
        kind = read_range(io, r, b, &err_no);
    }
    if (c->shared) plk_clock_leave(c->shared);
    plk_clock_leave(&io->own);
    pthread_mutex_lock(&io->m);
    if (kind == PLK_ERR_NONE) {
        io->st.bytes_read += r->nbytes;
        io->st.requests++;
    } else {
        io->group_failed[r->group] = 1;
        if (io->err.kind == PLK_ERR_NONE) io->err = (plk_io_error){kind, -1, r->group, err_no, r->offset, r->nbytes};
    }
    io->group_pending[r->group]--;
    r->dest = NULL;
    r->next_free = io->free_range;
    io->free_range = (int)(r - io->reqs);
    pthread_cond_broadcast(&io->done);
    pthread_mutex_unlock(&io->m);
}

static atomic_int live_readers;   /* reader threads running, over every plk_io (tests: plk_io_live_readers) */

int plk_io_live_readers(void) { return atomic_load(&live_readers); }

static void *reader(void *arg) {
    plk_io *io = arg;
    struct iovec *iov = malloc(sizeof(struct iovec) * (size_t)io->c.per_read);
    bounce_t b = {NULL, 0};
    if (!iov) return NULL;
    atomic_fetch_add(&live_readers, 1);
    pthread_mutex_lock(&io->m);
    for (;;) {
        while (!io->heap_n && !io->closing) pthread_cond_wait(&io->work, &io->m);
        if (io->closing) break;
        req_t *r = &io->reqs[heap_pop(io)];
        r->queued = 0;
        pthread_mutex_unlock(&io->m);
        int64_t delay = __atomic_load_n(&io->delay_us, __ATOMIC_RELAXED);
        if (delay > 0) {
            struct timespec ts = {(time_t)(delay / 1000000), (long)(delay % 1000000) * 1000};
            nanosleep(&ts, NULL);
        }
        if (r->dest) serve_range(io, r, &b);
        else serve(io, r, iov);
        pthread_mutex_lock(&io->m);
    }
    pthread_mutex_unlock(&io->m);
    free(iov);
    free(b.p);
    atomic_fetch_sub(&live_readers, 1);
    return NULL;
}

int plk_io_range(plk_io *io, int64_t offset, int64_t nbytes, uint8_t *dest, int group, int priority) {
    if (group < 0 || group >= io->c.n_groups || nbytes < 1 || offset < 0 || !dest) return -1;
    pthread_mutex_lock(&io->m);
    int i = io->free_range;
    if (i < 0) {
        pthread_mutex_unlock(&io->m);
        return -1;
    }
    req_t *q = &io->reqs[i];
    io->free_range = q->next_free;
    q->offset = offset; q->nbytes = nbytes; q->dest = dest; q->group = group;
    q->layer = -1; q->c0 = 0; q->n = 0; q->priority = priority; q->queued = 1;
    q->seq = io->seq++;
    io->group_pending[group]++;
    heap_push(io, i);
    pthread_cond_signal(&io->work);
    pthread_mutex_unlock(&io->m);
    return 0;
}

int plk_io_wait_group(plk_io *io, int group) {
    if (group < 0 || group >= io->c.n_groups) return -1;
    double t0 = now_s();
    pthread_mutex_lock(&io->m);
    while (io->group_pending[group] > 0) pthread_cond_wait(&io->done, &io->m);
    int failed = io->group_failed[group];
    io->group_failed[group] = 0;
    pthread_mutex_unlock(&io->m);
    io->st.wait_seconds += now_s() - t0;
    return failed ? -1 : 0;
}

plk_io *plk_io_new(const plk_io_conf *conf) {
    plk_io *io = calloc(1, sizeof *io);
    if (!io) return NULL;
    io->c = *conf;
    int64_t n = conf->n_slots, nr = conf->n_ranges > 0 ? conf->n_ranges : 0;
    size_t n1 = (size_t)(n > 0 ? n : 1), nn = (size_t)(conf->N > n ? conf->N : n1);   /* no zero-size allocations */
    int per = conf->per_read < 1 ? 1 : conf->per_read;
    io->c.per_read = per;
    io->c.n_groups = conf->n_groups > 0 ? conf->n_groups : 0;
    io->reqs = calloc((size_t)(n + nr) + 1, sizeof(req_t));
    io->req_slots = malloc(sizeof(int32_t) * n1 * (size_t)per);
    io->heap = malloc(sizeof(int) * ((size_t)(n + nr) + 1));
    io->req_of = malloc(sizeof(int32_t) * n1);
    io->cand = malloc(sizeof(int32_t) * n1);
    io->missing = malloc(sizeof(int32_t) * nn);
    io->tmp = malloc(sizeof(int32_t) * nn);
    io->all = malloc(sizeof(int32_t) * (size_t)(conf->N > 0 ? conf->N : 1));
    io->score = malloc(sizeof(int64_t) * n1);
    io->mark = calloc(n1, sizeof(uint32_t));
    io->group_pending = calloc((size_t)io->c.n_groups + 1, sizeof(int));
    io->group_failed = calloc((size_t)io->c.n_groups + 1, 1);
    io->threads = calloc((size_t)conf->n_threads, sizeof(pthread_t));
    if (!io->reqs || !io->req_slots || !io->heap || !io->req_of || !io->cand || !io->missing || !io->tmp || !io->all
        || !io->score || !io->mark || !io->group_pending || !io->group_failed || !io->threads) {
        plk_io_free(io);
        return NULL;
    }
    for (int i = 0; i < conf->N; i++) io->all[i] = i;
    for (int64_t i = 0; i < n; i++) {
        io->reqs[i].slots = io->req_slots + i * per;
        io->reqs[i].next_free = i + 1 < n ? (int)(i + 1) : -1;
    }
    for (int64_t i = n; i < n + nr; i++) io->reqs[i].next_free = i + 1 < n + nr ? (int)(i + 1) : -1;
    io->free_req = n ? 0 : -1;
    io->free_range = nr ? (int)n : -1;
    io->fail_after = -1;
    pthread_mutex_init(&io->m, NULL);
    pthread_cond_init(&io->work, NULL);
    pthread_cond_init(&io->done, NULL);
    plk_clock_init(&io->own);
    for (int i = 0; i < conf->n_threads; i++) {
        if (pthread_create(&io->threads[i], NULL, reader, io) != 0) break;
        io->n_started++;
    }
    if (!io->n_started) { plk_io_free(io); return NULL; }
    return io;
}

void plk_io_free(plk_io *io) {
    if (!io) return;
    if (io->n_started) {
        pthread_mutex_lock(&io->m);
        io->closing = 1;
        pthread_cond_broadcast(&io->work);
        pthread_mutex_unlock(&io->m);
        for (int i = 0; i < io->n_started; i++) pthread_join(io->threads[i], NULL);
    }
    free(io->reqs); free(io->req_slots); free(io->heap); free(io->req_of); free(io->cand);
    free(io->missing); free(io->tmp); free(io->all); free(io->score); free(io->mark); free(io->threads); free(io->wtmp);
    free(io->group_pending); free(io->group_failed);
    free(io);
}

/* -- the compute thread's side ----------------------------------------------------------------------------- */
static inline int8_t state_of(const plk_io *io, int32_t s) {
    return __atomic_load_n(&io->c.state[s], __ATOMIC_ACQUIRE);
}

/* Queue one read of n adjacent bundles c0.. of layer into slots (their state LOADING). Under m. */
static void queue_read(plk_io *io, int layer, int c0, const int32_t *slots, int n, int priority) {
    int r = io->free_req;            /* a request per run of >= 1 loading slots: the pool (n_slots) suffices */
    if (r < 0) {                     /* only if a caller re-reads into loading slots (a bug): fail those reads */
        for (int i = 0; i < n; i++) __atomic_store_n(&io->c.state[slots[i]], PLK_SLOT_FAILED, __ATOMIC_RELAXED);
        if (io->err.kind == PLK_ERR_NONE) io->err = (plk_io_error){PLK_ERR_SLOTS, layer, c0, 0, 0, 0};
        return;
    }
    req_t *q = &io->reqs[r];
    io->free_req = q->next_free;
    q->offset = io->c.layer_off[layer] + (int64_t)c0 * io->c.lstride[layer];
    q->layer = layer; q->c0 = c0; q->n = n; q->priority = priority; q->queued = 1;
    q->seq = io->seq++;
    for (int i = 0; i < n; i++) {
        q->slots[i] = slots[i];
        io->req_of[slots[i]] = r;
        __atomic_store_n(&io->c.state[slots[i]], PLK_SLOT_LOADING, __ATOMIC_RELAXED);
    }
    heap_push(io, r);
}

/* Reads of the (increasing) clusters ids of layer into slots: runs of adjacent bundles, per_read at most. */
static void submit(plk_io *io, int layer, const int32_t *ids, const int32_t *slots, int n, int priority) {
    if (!n) return;
    pthread_mutex_lock(&io->m);
    int i = 0;
    while (i < n) {
        int j = i + 1;
        while (j < n && j - i < io->c.per_read && ids[j] == ids[j - 1] + 1) j++;
        queue_read(io, layer, ids[i], slots + i, j - i, priority);
        i = j;
    }
    pthread_cond_broadcast(&io->work);
    pthread_mutex_unlock(&io->m);
}

int plk_io_read(plk_io *io, int layer, int c0, const int32_t *slots, int n, int priority) {
    if (layer < 0 || layer >= io->c.L || c0 < 0 || n < 1 || c0 + n > io->c.N || n > io->c.per_read) return -1;
    pthread_mutex_lock(&io->m);
    queue_read(io, layer, c0, slots, n, priority);
    pthread_cond_signal(&io->work);
    pthread_mutex_unlock(&io->m);
    return 0;
}

/* Demanded slots still queued behind read-ahead go to the front (priority 0). */
static void bump(plk_io *io, const int32_t *slots, int n) {
    int changed = 0;
    pthread_mutex_lock(&io->m);
    for (int i = 0; i < n; i++) {
        if (state_of(io, slots[i]) != PLK_SLOT_LOADING) continue;
        req_t *q = &io->reqs[io->req_of[slots[i]]];
        if (q->queued && q->priority > 0) { q->priority = 0; changed = 1; }
    }
    if (changed)
        for (int i = io->heap_n / 2 - 1; i >= 0; i--) sift_down(io, i);
    pthread_mutex_unlock(&io->m);
}

static int wait_slots(plk_io *io, const int32_t *slots, int n, int counted) {
    int i = 0;
    while (i < n && state_of(io, slots[i]) == PLK_SLOT_READY) i++;
    if (i == n) return 0;
    double t0 = now_s();
    int failed = 0;
    pthread_mutex_lock(&io->m);
    for (; i < n; i++) {
        int8_t s;
        while ((s = state_of(io, slots[i])) == PLK_SLOT_LOADING) pthread_cond_wait(&io->done, &io->m);
        if (s == PLK_SLOT_FAILED) failed = 1;
    }
    pthread_mutex_unlock(&io->m);
    if (counted) io->st.wait_seconds += now_s() - t0;
    if (!failed) return 0;
    for (i = 0; i < n; i++) {          /* a failed read leaves nothing cached: a retry reads again */
        int32_t s = slots[i];
        if (state_of(io, s) != PLK_SLOT_FAILED) continue;
        if (io->c.key[s] >= 0) io->c.slot_of[io->c.key[s]] = -1;
        io->c.key[s] = -1;
        io->c.pinned[s] = 0;
        __atomic_store_n(&io->c.state[s], PLK_SLOT_FREE, __ATOMIC_RELAXED);
    }
    return -1;
}

int plk_io_wait_all(plk_io *io) {
    int k = 0;
    for (int64_t s = 0; s < io->c.n_slots; s++)
        if (state_of(io, (int32_t)s) == PLK_SLOT_LOADING) io->cand[k++] = (int32_t)s;
    return wait_slots(io, io->cand, k, 0);
}

/* quickselect: the k lowest scores of cand[0..n) to its front */
static void select_lowest(int32_t *cand, int64_t *score, int n, int k) {
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        int64_t pivot = score[lo + (hi - lo) / 2];
        int i = lo, j = hi;
        while (i <= j) {
            while (score[i] < pivot) i++;
            while (score[j] > pivot) j--;
            if (i <= j) {
                int64_t ts = score[i]; score[i] = score[j]; score[j] = ts;
                int32_t tc = cand[i]; cand[i] = cand[j]; cand[j] = tc;
                i++; j--;
            }
        }
        if (k - 1 <= j) hi = j;
        else if (k - 1 >= i) lo = i;
        else return;
    }
}

/* Up to k slots to read into, into io->cand (free first, then evicted by the policy); slots locked by this
 * fetch, marked (protected by this call), pinned or loading stay; read-ahead slots only for a demand. */
static int take(plk_io *io, int k, int demand) {
    const plk_io_conf *c = &io->c;
    int n = 0;
    for (int64_t s = 0; s < c->n_slots; s++) {
        if (c->pinned[s] || c->lock[s] == io->epoch || io->mark[s] == io->mark_epoch
            || state_of(io, (int32_t)s) == PLK_SLOT_LOADING || (!demand && c->pending[s])) continue;
        int32_t key = c->key[s];
        int64_t sc;
        if (key < 0) sc = -1;
        else if (c->policy == PLK_LRU) sc = c->last_used[s];
        else if (c->policy == PLK_FIFO) sc = c->loaded_at[s];
        else sc = (c->freq[key] << 32) + c->last_used[s];   /* lfu; ties: least recent */
        io->cand[n] = (int32_t)s;
        io->score[n++] = sc;
    }
    if (n <= k) return n;
    select_lowest(io->cand, io->score, n, k);
    return k;
}

static void assign(plk_io *io, int layer, const int32_t *ids, const int32_t *slots, int n) {
    plk_io_conf *c = &io->c;
    for (int i = 0; i < n; i++) {
        int32_t s = slots[i], old = c->key[s];
        if (old >= 0) {
            c->slot_of[old] = -1;
            io->st.evictions++;
            if (c->fresh[s]) io->st.wasted++;
        }
        c->key[s] = layer * c->N + ids[i];
        c->slot_of[c->key[s]] = s;
        c->fresh[s] = 1;
        c->loaded_at[s] = io->tick;
    }
}

static int increasing(const int32_t *ids, int n, int N) {
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= N || (i && ids[i] <= ids[i - 1])) return 0;
    return 1;
}

static void error_at(plk_io *io, int kind, int layer, int64_t a, int64_t b) {
    pthread_mutex_lock(&io->m);
    io->err = (plk_io_error){kind, layer, (int)a, 0, 0, b};
    pthread_mutex_unlock(&io->m);
}

/* Read the clusters of ids (increasing) of layer that are not cached; 1 if all fitted, 0 if slots ran out
 * (read ahead only), -1 (demand: no slots). Marks the cached ones so this call does not evict them. */
static int fetch_missing(plk_io *io, int layer, const int32_t *ids, int n, int demand, int priority) {
    plk_io_conf *c = &io->c;
    int m = 0;
    io->mark_epoch++;
    for (int i = 0; i < n; i++) {
        int32_t s = c->slot_of[(int64_t)layer * c->N + ids[i]];
        if (s >= 0) io->mark[s] = io->mark_epoch;
        else io->missing[m++] = ids[i];
    }
    if (!m) return 1;
    int got = take(io, m, demand);
    if (got < m && demand) {
        /* slots still being read ahead: let those reads land, then they can be evicted */
        int k = 0;
        for (int64_t s = 0; s < c->n_slots; s++)
            if (state_of(io, (int32_t)s) == PLK_SLOT_LOADING && c->lock[s] != io->epoch && !c->pinned[s])
                io->tmp[k++] = (int32_t)s;
        wait_slots(io, io->tmp, k, 1);
        got = take(io, m, demand);
    }
    if (got < m && demand) {
        /* a layer asking for more bundles than the unpinned pool holds: borrow pinned slots of other layers
         * (they stop being hot; counted in "unpinned"). The plan keeps all slots >= one layer. */
        int short_ = m - got;
        for (int64_t s = 0; s < c->n_slots && short_ > 0; s++)
            if (c->pinned[s] && c->lock[s] != io->epoch && c->key[s] >= 0 && c->key[s] / c->N != layer) {
                c->pinned[s] = 0;
                io->st.unpinned++;
                short_--;
            }
        got = take(io, m, demand);
    }
    int ok = 1;
    if (got < m) {
        if (demand) {
            error_at(io, PLK_ERR_SLOTS, layer, m, got);
            return -1;
        }
        ok = 0;
        m = got;
    }
    /* the taken slots, in the order of the missing ids (the reads merge adjacent bundles) */
    assign(io, layer, io->missing, io->cand, m);
    for (int i = 0; i < m; i++) c->pending[io->cand[i]] = !demand;
    submit(io, layer, io->missing, io->cand, m, priority);
    return ok;
}

int plk_io_prefetch(plk_io *io, int layer, const int32_t *ids, int n, int priority) {
    if (layer < 0 || layer >= io->c.L || !increasing(ids, n, io->c.N)) {
        error_at(io, PLK_ERR_ORDER, layer, n, 0);
        return -1;
    }
    return fetch_missing(io, layer, ids, n, 0, priority);
}

int plk_io_fetch(plk_io *io, int layer, const int32_t *ids, int n, uint64_t *out, int dense, int depth) {
    plk_io_conf *c = &io->c;
    if (layer < 0 || layer >= c->L || !increasing(ids, n, c->N)) {
        error_at(io, PLK_ERR_ORDER, layer, n, 0);
        return -1;
    }
    io->epoch++;                      /* releases the last answer's slots */
    io->tick++;
    if (layer == 0) io->st.passes++;
    int64_t base = (int64_t)layer * c->N;
    for (int i = 0; i < n; i++) {     /* what is cached stays: locked before any slot is taken */
        int32_t s = c->slot_of[base + ids[i]];
        if (s >= 0) c->lock[s] = io->epoch;
    }
    if (fetch_missing(io, layer, ids, n, 1, 0) < 0) return -1;
    int32_t *slots = io->tmp;
    for (int i = 0; i < n; i++) {
        slots[i] = c->slot_of[base + ids[i]];
        c->lock[slots[i]] = io->epoch;
    }
    bump(io, slots, n);
    if (dense)                        /* every bundle of a layer is needed: keep the next layers' reads queued */
        for (int d = 1; d <= (depth > 1 ? depth : 1); d++)
            if (fetch_missing(io, (layer + d) % c->L, io->all, c->N, 0, d) < 1) break;
    if (wait_slots(io, slots, n, 1) < 0) return -1;
    for (int i = 0; i < n; i++) {
        int32_t s = slots[i];
        if (c->fresh[s]) {
            io->st.misses++;
            if (!c->pending[s]) io->st.demand_misses++;
        } else {
            io->st.hits++;
        }
        c->fresh[s] = 0;
        c->pending[s] = 0;
        c->last_used[s] = io->tick;
        c->freq[base + ids[i]]++;
        out[i] = (uint64_t)(uintptr_t)(c->arena + (int64_t)s * c->stride);
    }
    return 0;
}

int plk_io_pin(plk_io *io, int layer, const int32_t *ids, int n) {
    plk_io_conf *c = &io->c;
    if (layer < 0 || layer >= c->L || !increasing(ids, n, c->N) || io->next_pin + n > c->n_slots) {
        error_at(io, PLK_ERR_ORDER, layer, n, 0);
        return -1;
    }
    int32_t *slots = io->tmp;
    for (int i = 0; i < n; i++) slots[i] = (int32_t)(io->next_pin + i);
    io->next_pin += n;
    assign(io, layer, ids, slots, n);
    for (int i = 0; i < n; i++) c->pinned[slots[i]] = 1;
    submit(io, layer, ids, slots, n, 0);
    return 0;
}

void plk_io_stats_get(plk_io *io, plk_io_stats *st) {
    pthread_mutex_lock(&io->m);
    *st = io->st;
    pthread_mutex_unlock(&io->m);
    st->busy_seconds = plk_clock_seconds(&io->own);
}

void plk_io_last_error(plk_io *io, plk_io_error *err) {
    pthread_mutex_lock(&io->m);
    *err = io->err;
    io->err.kind = PLK_ERR_NONE;
    pthread_mutex_unlock(&io->m);
}

void plk_io_count(plk_io *io, int64_t hits, int64_t misses, int passes) {
    io->st.hits += hits;
    io->st.misses += misses;
    io->st.passes += passes;
}

void plk_io_inject(plk_io *io, int64_t after, int err_no) {
    io->fail_errno = err_no;
    __atomic_store_n(&io->fail_after, after, __ATOMIC_RELAXED);
}

void plk_io_inject_delay(plk_io *io, int64_t usec) { __atomic_store_n(&io->delay_us, usec, __ATOMIC_RELAXED); }

/* -- the dense window --------------------------------------------------------------------------------- */
static void stream_issue(plk_io *io) {
    const plk_stream *w = &io->win;
    int64_t end = io->used + w->W;
    while (io->issued < end) {
        int64_t g0 = io->issued, c0 = g0 % w->cycle;
        int l = w->item_layer[c0];
        int64_t stop = g0 + io->c.per_read;                          /* one read: one layer, one block at most */
        if (stop > end) stop = end;
        if (stop > g0 + w->layer_base[l + 1] - c0) stop = g0 + w->layer_base[l + 1] - c0;
        const int32_t *ids = w->item_id + c0;
        int run = 1;
        while (run < stop - g0 && ids[run] == ids[run - 1] + 1) run++;   /* one contiguous file range */
        for (int i = 0; i < run; i++) io->wtmp[i] = w->win[(g0 + i) % w->W];
        plk_io_read(io, l, ids[0], io->wtmp, run, 0);
        io->issued += run;
    }
}

int plk_io_stream_begin(plk_io *io, const plk_stream *s) {
    if (!io->wtmp && !(io->wtmp = (int32_t *)malloc(sizeof(int32_t) * (size_t)io->c.n_slots))) return -1;
    io->win = *s;
    io->issued = io->used = io->next = 0;
    if (s->cycle) stream_issue(io);
    return 0;
}

int plk_io_stream_piece(plk_io *io, int layer, int i0, int i1, const uint64_t **addr) {
    const plk_stream *w = &io->win;
    const plk_io_conf *c = &io->c;
    const int64_t *before = w->before + (int64_t)layer * (c->N + 1);
    int64_t f0 = before[i0], f1 = before[i1], n = f1 - f0;
    uint64_t *a = w->addr + (int64_t)layer * c->N;
    if (layer == 0 && i0 == 0) io->st.passes++;
    io->st.hits += (i1 - i0) - n;                                    /* pinned bundles: in place */
    io->st.misses += n;
    *addr = a + i0;
    if (!w->cycle) return 0;
    int64_t pos = w->layer_base[layer] + f0;                         /* where the piece starts in the cycle */
    int64_t g = io->next;
    if (pos != g % w->cycle) {                                       /* drain, then restart the stream here */
        if (plk_io_wait_all(io) < 0) return -1;
        g = g - g % w->cycle + w->cycle + pos;
        io->issued = g;
    }
    io->used = g;                                                    /* everything before is computed */
    stream_issue(io);
    io->next = g + n;
    if (!n) return 0;
    int32_t *slots = io->wtmp;
    for (int64_t i = 0; i < n; i++) slots[i] = w->win[(g + i) % w->W];
    if (wait_slots(io, slots, (int)n, 1) < 0) return -1;
    const int32_t *fp = w->free_pos + (int64_t)layer * c->N + f0;
    for (int64_t i = 0; i < n; i++) a[fp[i]] = (uint64_t)(uintptr_t)(c->arena + (int64_t)slots[i] * c->stride);
    return 0;
}
