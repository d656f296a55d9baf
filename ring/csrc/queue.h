/* queue.h -- the queue layer's C half: the one owner of the wake-up rules.
 *
 * Like ring.h this is both the C header and the cffi cdef (plain
 * declarations only); it comes after ring.h.  A device's C never masks,
 * unmasks, commits, polls or sleeps itself: it parses or builds one packet
 * in a callback and the layer does the rest, following
 * docs/vmbus-reference sections 1.6-1.7 (the rules are spelt out at the top
 * of queue.c).
 *
 * Host side: pv_serve() drains a channel's inbound ring in batches with its
 * interrupt masked, hands each packet to a per-packet handler, publishes the
 * completions and the freed request space (each commit with its own signal
 * decision), backs off through pending_send_sz when the completion ring is
 * full, spins for more work for spin_us, then unmasks, re-checks and sleeps
 * on the kick fd until the peer signals or the owner rings stop_fd.
 *
 * Guest side: pv_stage() writes a batch of requests with a per-request
 * builder (unpublished: the caller masks what it will poll, then commits);
 * pv_reap() takes every completion waiting with a per-packet decoder.  Who
 * masks and who re-checks is vmbus/queue.py's job (one Python place).
 */

/* Bumped whenever pv_ring, pv_packet, pv_server or a callback signature
 * changes: the ring extension and every device extension export it, and
 * ring.check_device_module compares them (and the struct sizes) at import. */
#define PV_RING_ABI_VERSION 2

/* What a host handler says about one packet. */
#define PV_HANDLED 0          /* served, its answer staged in `out`: take it */
#define PV_NOT_MINE 1         /* leave it at the head for the Python path */
#define PV_NO_ROOM 2          /* no room in `out` for its answer yet: retry later */
#define PV_HANDLED_PUBLISH 3  /* served; publish now, do not batch behind it */

/* pv_serve results (bits). */
#define PV_SERVE_SIGNAL 1     /* the peer must be interrupted (no signal_fd) */
#define PV_SERVE_PUNT 2       /* the packet at the head is Python's */
#define PV_SERVE_CORRUPT 4    /* a ring is corrupt (its handle says why) */
#define PV_SERVE_STOPPED 8    /* the owner asked to stop */

/* Serve one packet: parse it from `pkt` (a private copy of the descriptor;
 * its bytes are in the inbound ring at pkt->ring_offset, to be copied out
 * once before checking), do the work, stage the answer in `out` with
 * pv_ring_write.  Never commit, mask or sleep. */
typedef int (*pv_handler)(void *ctx, pv_ring *in, const pv_packet *pkt, pv_ring *out);

typedef struct {
    pv_ring   *inbound;        /* requests: we are its consumer */
    pv_ring   *outbound;       /* answers: we are its producer */
    pv_handler handle;
    void      *ctx;
    int        kick_fd;        /* the peer's signals land here (eventfd) */
    int        stop_fd;        /* eventfd: wakes a sleeping serve to stop */
    int        signal_fd;      /* >= 0: signal the peer by writing this eventfd;
                                  -1: return PV_SERVE_SIGNAL and let the caller */
    int        stop;           /* set by the owner, read atomically */
    uint32_t   spin_us;        /* poll this long for more work before sleeping */
    uint32_t   batch_max;      /* packets between two publishes (0: 256) */
    uint32_t   room_needed;    /* free bytes a PV_NO_ROOM handler waits for */

    /* counters, kept by the layer (private memory) */
    uint64_t   served;         /* packets handled */
    uint64_t   punted;         /* returns for a packet Python must take */
    uint64_t   publishes;      /* commits of answers that moved the index */
    uint64_t   signals;        /* signals the rings asked for */
    uint64_t   wakeups;        /* sleeps ended by the peer's signal */
    uint64_t   sleeps;         /* times we slept on the kick fd */
    uint64_t   polls_hit;      /* spins that found more work */
    uint64_t   ring_full_waits;/* back-offs on a full answer ring */
} pv_server;

int pv_serve(pv_server *s);

/* The two waits of pv_serve on their own, for a peer that drives its rings
 * itself (the ring benchmark's processes) over the same pv_server fields
 * (handle, ctx and batch_max unused; stop_fd may be -1).
 *
 * pv_wait_readable: return 0 once `inbound` has data, with its interrupt
 * masked (the caller drains it and commits before calling again); in
 * between poll for spin_us, unmask and re-check, sleep on kick_fd.
 * pv_wait_writable: return 0 once `outbound` has more than `needed` free
 * bytes; in between arm pending_send_sz (which re-checks) and sleep.
 * Both: else PV_SERVE_STOPPED or PV_SERVE_CORRUPT. */
int pv_wait_readable(pv_server *s);
int pv_wait_writable(pv_server *s, uint32_t needed);

/* Bytes staged in `out` and not yet published: 0 right after the layer's
 * commit, so a handler can tell where a publish batch starts. */
uint32_t pv_unpublished(const pv_ring *out);

/* A host handler for tests and benchmarks: answers every packet that asks
 * for a completion with a completion carrying the same payload (512 bytes
 * at most, larger ones are NOT_MINE); others are taken silently.  `ctx` is
 * NULL or a pv_echo_pacing: before each answer the handler spins a
 * pseudo-random 0..max_spins pause rounds (a stress test spreads the
 * answers in time with it, as a real device's work would). */
typedef struct {
    uint32_t max_spins;
    uint32_t state;        /* xorshift32 state, non-zero */
} pv_echo_pacing;

int pv_echo_handler(void *ctx, pv_ring *in, const pv_packet *pkt, pv_ring *out);

/* Guest side: build request `item` into `out` with pv_ring_write (not
 * committed); PV_OK, or the ring's refusal (PV_FULL with *needed, ...). */
typedef int (*pv_builder)(void *ctx, const void *item, pv_ring *out, uint32_t *needed);

/* Decode one completion `pkt` (bytes in `in` at pkt->ring_offset) into
 * `slot`; the layer takes the packet afterwards.  Returns 0. */
typedef int (*pv_decoder)(void *ctx, pv_ring *in, const pv_packet *pkt, void *slot);

/* Stage items[0..n) (item_size bytes apart) with `build`; *staged says how
 * many went in.  PV_OK when all did, else the refusal of the next one. */
int pv_stage(pv_ring *out, pv_builder build, void *ctx, const void *items, size_t item_size, uint32_t n,
             uint32_t *staged, uint32_t *needed);

/* Take up to `max` packets from `in`, decoding each into slots (slot_size
 * bytes apart); *n says how many.  PV_OK, PV_EMPTY (none) or PV_CORRUPT
 * (after the ones before it).  The caller commits the read. */
int pv_reap(pv_ring *in, pv_decoder decode, void *ctx, void *slots, size_t slot_size, uint32_t max, uint32_t *n);

/* A guest decoder for tests and benchmarks: trans_id, type and the first
 * 8 payload bytes of each packet into a pv_echo_reply. */
typedef struct {
    uint64_t trans_id;
    uint64_t first_word;
    uint16_t type;
    uint16_t reserved[3];
} pv_echo_reply;

int pv_echo_decoder(void *ctx, pv_ring *in, const pv_packet *pkt, void *slot);

/* Stage n in-band requests asking for completion, trans ids trans_id0.., each
 * an 8-byte payload of its trans id (the stress test's and benchmark's
 * requests).  As pv_stage. */
int pv_stage_counted(pv_ring *out, uint64_t trans_id0, uint32_t n, uint32_t *staged, uint32_t *needed);

/* pv_reap with pv_echo_decoder. */
int pv_echo_reap(pv_ring *in, pv_echo_reply *replies, uint32_t max, uint32_t *n);
