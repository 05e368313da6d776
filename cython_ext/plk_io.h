/* The streaming core of an offloaded run (powerlow.cache): the slot table of the segmented neuron cache, the
 * request queue and the reader threads, in C. Nothing here takes the GIL: reader threads pread bundles into
 * slots, check their CRC32C and mark them ready; the compute thread asks for a layer's bundles with one call
 * (plk_io_fetch) and waits, if it must, on a condition variable.
 *
 * The tables are arrays the caller owns (numpy arrays in powerlow.cache, so rare bookkeeping such as the
 * self-drafter's pinned bundles stays readable from Python); only `state` is shared with the readers. */
#ifndef PLK_IO_H
#define PLK_IO_H
#include <pthread.h>
#include <stdint.h>

enum { PLK_SLOT_FREE = 0, PLK_SLOT_LOADING = 1, PLK_SLOT_READY = 2, PLK_SLOT_FAILED = 3 };
enum { PLK_LRU = 0, PLK_LFU = 1, PLK_FIFO = 2 };
enum { PLK_ERR_NONE = 0, PLK_ERR_IO = 1, PLK_ERR_EOF = 2, PLK_ERR_CRC = 3, PLK_ERR_SLOTS = 4, PLK_ERR_ORDER = 5 };

/* Wall time with at least one read in flight, over every reader sharing it (the FFN bundles and the streamed
 * attention share one disk). */
typedef struct {
    pthread_mutex_t m;
    int in_flight;
    double since, done;
} plk_clock;

void plk_clock_init(plk_clock *c);
void plk_clock_enter(plk_clock *c);
void plk_clock_leave(plk_clock *c);
double plk_clock_seconds(plk_clock *c);

typedef struct {
    int fd, direct;               /* direct: O_DIRECT; else each read is dropped from the page cache after */
    uint8_t *arena;               /* n_slots * stride bytes, 4 KiB aligned */
    int64_t n_slots, stride;
    int L, N;                     /* layers, bundles (clusters) per layer */
    const int64_t *layer_off;     /* [L] file offset of a layer's first bundle */
    const int64_t *lstride;       /* [L] bytes of one bundle of the layer (<= stride) */
    int per_read;                 /* most adjacent bundles one read merges */
    int n_threads;
    int policy;                   /* PLK_LRU | PLK_LFU | PLK_FIFO */
    const uint32_t *sums;         /* [L*N] CRC32C of each bundle, or NULL */
    int check_every;              /* check every read, not only a bundle's first */
    plk_clock *shared;            /* also kept up to date (or NULL) */
    /* the tables (caller-owned, sized as noted) */
    int32_t *slot_of;             /* [L*N] slot holding (layer, cluster), -1 */
    int32_t *key;                 /* [n] layer*N + cluster held, -1 */
    int8_t *state;                /* [n] PLK_SLOT_* (readers write it) */
    int64_t *lock;                /* [n] == epoch while part of the last fetch's answer */
    uint8_t *pending, *fresh, *pinned;   /* [n] read ahead and unused / read and unused / never evicted */
    int64_t *last_used, *loaded_at;      /* [n] ticks */
    int64_t *freq;                /* [L*N] times asked for */
    uint8_t *verified;            /* [L*N] checked once in this run */
    /* byte ranges into caller memory (plk_io_range): the weight ring's reads of resident.safetensors */
    int n_ranges;                 /* most range reads outstanding at once (0: none) */
    int n_groups;                 /* completion groups they count down */
} plk_io_conf;

typedef struct {
    int64_t hits, misses, demand_misses, evictions, wasted, unpinned, passes;
    int64_t bytes_read, requests, checks;   /* checks: bundles whose CRC32C a reader computed */
    double wait_seconds, busy_seconds;
} plk_io_stats;

typedef struct {
    int kind;                     /* PLK_ERR_*; PLK_ERR_SLOTS: cluster = slots needed, nbytes = slots free */
    int layer, cluster, err_no;
    int64_t offset, nbytes;
} plk_io_error;

typedef struct plk_io plk_io;

plk_io *plk_io_new(const plk_io_conf *conf);              /* NULL: out of memory or no thread could start */
void plk_io_free(plk_io *io);                             /* stops the readers (queued reads are dropped) */
/* reader threads running now, over every plk_io: plk_io_free returns after its own have finished the read each was
 * serving (into memory the caller must keep until then) and exited */
int plk_io_live_readers(void);
/* Layer `layer`'s bundles of `ids` (strictly increasing cluster ids): misses read now (top priority), hits kept;
 * with `dense`, the next max(1, depth) layers are read ahead. out[i] = address of ids[i]'s bundle, valid until the
 * next fetch. 0, or -1 with plk_io_last_error. */
int plk_io_fetch(plk_io *io, int layer, const int32_t *ids, int n, uint64_t *out, int dense, int depth);
/* Start reading what `layer` will probably need (never evicts a pinned, locked or read-ahead slot). 1 if all
 * fitted, 0 if slots ran out, -1 on bad ids. */
int plk_io_prefetch(plk_io *io, int layer, const int32_t *ids, int n, int priority);
/* Pin ids of layer into the next unpinned slots (from slot 0 up) and queue their reads. -1: no room. */
int plk_io_pin(plk_io *io, int layer, const int32_t *ids, int n);
/* Low level (the dense window): read n adjacent bundles c0.. of layer into slots (state LOADING until read). */
int plk_io_read(plk_io *io, int layer, int c0, const int32_t *slots, int n, int priority);
int plk_io_wait_all(plk_io *io);                           /* every outstanding read */
void plk_io_stats_get(plk_io *io, plk_io_stats *st);
void plk_io_last_error(plk_io *io, plk_io_error *err);    /* and clears it */
/* Fault injection (tests): after `after` more successful reads, every read fails with errno err_no (-1: off). */
void plk_io_inject(plk_io *io, int64_t after, int err_no);
void plk_io_inject_delay(plk_io *io, int64_t usec);         /* tests: a reader sleeps usec before each read */
void plk_io_count(plk_io *io, int64_t hits, int64_t misses, int passes);   /* the dense window's own counts */

/* Byte ranges into caller memory (any offset and length; with O_DIRECT through the reader's aligned bounce
 * buffer, one copy): the weight ring's streamed tensors. A core may have no slots at all (n_slots = 0, L = 0) and
 * serve only these. `group` (< n_groups) counts its outstanding reads; -1: no free range request (wait a group). */
int plk_io_range(plk_io *io, int64_t offset, int64_t nbytes, uint8_t *dest, int group, int priority);
/* Wait until every read of `group` has landed. 0, or -1 if one failed since the last wait (plk_io_last_error:
 * layer -1, cluster = group). */
int plk_io_wait_group(plk_io *io, int group);

/* The dense window (a dense offloaded run): every unpinned bundle of every layer streams, in the order the FFN
 * computes them, through W window slots; item g of the cyclic stream goes to slot win[g % W] and is read once item
 * g - W has been used. The caller (powerlow.cache) works out these tables once and owns them. */
typedef struct {
    int W;                        /* window slots */
    const int32_t *win;           /* [W] their slot ids, in order */
    int64_t cycle;                /* streamed items in one pass over the layers (0: everything pinned) */
    const int32_t *item_layer;    /* [cycle] layer of each item */
    const int32_t *item_id;       /* [cycle] cluster id of each item */
    const int64_t *layer_base;    /* [L+1] a layer's first item */
    const int64_t *before;        /* [L*(N+1)] streamed items among a layer's first i compute positions */
    const int32_t *free_pos;      /* [L*N] the compute positions of a layer's streamed items, in order */
    uint64_t *addr;               /* [L*N] bundle addresses in compute order (the pinned ones filled in) */
} plk_stream;

/* Start the window over `s` (its arrays must outlive the core or the next stream_begin): queues the first W reads.
 * 0, or -1 (no memory). */
int plk_io_stream_begin(plk_io *io, const plk_stream *s);
/* Compute positions i0..i1 of `layer` (pieces in order): the previous piece is computed, so its window slots are
 * read into next; waits for this piece's reads; *addr = the layer's addresses from i0. A piece out of order (an
 * interrupted pass) drains the reads and restarts the stream there. 0, or -1 (a failed read: plk_io_last_error). */
int plk_io_stream_piece(plk_io *io, int layer, int i0, int i1, const uint64_t **addr);

/* What another extension (powerlow._kernels' SparseStep: a layer's predictor, fetch, prefetch and FFN in one
 * call) calls the core through: a table of these functions in the capsule powerlow._iocore.API, and a SlotCore's
 * plk_io pointer from its `handle`. Only the calls of a layer's hot path. */
typedef struct {
    int (*fetch)(plk_io *io, int layer, const int32_t *ids, int n, uint64_t *out, int dense, int depth);
    int (*prefetch)(plk_io *io, int layer, const int32_t *ids, int n, int priority);
    int (*stream_piece)(plk_io *io, int layer, int i0, int i1, const uint64_t **addr);
} plk_io_api;
#define PLK_IO_API_NAME "powerlow._iocore.API"

#endif
