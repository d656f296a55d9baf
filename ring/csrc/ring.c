/* ring.c -- the hot path of a VMBus ring: stage, publish, take, release.
 *
 * Signalling contract (the same as torvalds/linux drivers/hv/ring_buffer.c
 * and microsoft/openvmm vmbus_ring, see docs/vmbus-reference sections 1.6
 * and 1.7):
 *
 *  - The producer owns write_index and pending_send_sz, the consumer owns
 *    read_index and interrupt_mask.  Each side reads the other's words and
 *    trusts none of them: every index is read once into a local, checked
 *    (< size, 8-aligned) and only the local is used afterwards.
 *  - The producer signals the consumer only on the empty -> non-empty
 *    transition of a committed batch, and only while the consumer has not
 *    set interrupt_mask.  A batch of N packets costs at most one signal.
 *  - A consumer that masked interrupts to drain must, after clearing the
 *    mask, re-check for data (pv_ring_unmask returns it): a packet
 *    published while the mask was set raised no signal.
 *  - A producer that found the ring full may store the free space it needs
 *    in pending_send_sz; the consumer signals it exactly once, when a
 *    commit moves the free space from "not enough" to "enough" (an exact
 *    fit is still not enough, because a ring is never filled completely:
 *    read_index == write_index must keep meaning "empty").
 *
 * Memory ordering uses C11 atomics on the four control words.  Plain
 * uint32_t fields of the shared page are accessed through _Atomic casts;
 * GCC and Clang give _Atomic uint32_t the same size and alignment as
 * uint32_t, which is what makes the cast sound.
 */
#include <stdatomic.h>
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <time.h>

#include "ring.h"

#if defined(__x86_64__) || defined(__i386__)
#define cpu_relax() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() ((void)0)
#endif

#define ACCESS(p) ((_Atomic uint32_t *)(p))

static inline uint32_t load_acquire(uint32_t *p)
{
    return atomic_load_explicit(ACCESS(p), memory_order_acquire);
}

static inline uint32_t load_relaxed(uint32_t *p)
{
    return atomic_load_explicit(ACCESS(p), memory_order_relaxed);
}

static inline void store_release(uint32_t *p, uint32_t v)
{
    atomic_store_explicit(ACCESS(p), v, memory_order_release);
}

static inline void store_relaxed(uint32_t *p, uint32_t v)
{
    atomic_store_explicit(ACCESS(p), v, memory_order_relaxed);
}

static inline int index_ok(const pv_ring *r, uint32_t idx)
{
    return idx < r->size && (idx & 7u) == 0;
}

/* Bytes between `from` and `to` going forward around the ring. */
static inline uint32_t distance(const pv_ring *r, uint32_t from, uint32_t to)
{
    return to >= from ? to - from : r->size - from + to;
}

/* Free bytes for a producer at `w` when the consumer is at `rd`.  An empty
 * ring reports all `size` bytes; the producer still needs strictly more
 * than it writes (see pv_ring_write). */
static inline uint32_t bytes_to_write(const pv_ring *r, uint32_t w, uint32_t rd)
{
    return w >= rd ? r->size - (w - rd) : rd - w;
}

static inline uint32_t wrap(const pv_ring *r, uint64_t off)
{
    return (uint32_t)(off % r->size);
}

static int corrupt(pv_ring *r, uint32_t reason, uint32_t value)
{
    if (r->corrupt_reason == PV_CORRUPT_NONE) {
        r->corrupt_reason = reason;
        r->corrupt_value = value;
    }
    return PV_CORRUPT;
}

/* Copy into the data area at `off`, splitting at the end; `off` < size and
 * len <= size are guaranteed by every caller. */
static uint32_t copy_in(pv_ring *r, uint32_t off, const uint8_t *src, size_t len)
{
    size_t first = r->size - off;
    if (len <= first) {
        memcpy(r->data + off, src, len);
    } else {
        memcpy(r->data + off, src, first);
        memcpy(r->data, src + first, len - first);
    }
    return wrap(r, (uint64_t)off + len);
}

static uint32_t zero_in(pv_ring *r, uint32_t off, size_t len)
{
    static const uint8_t zeros[8];
    return copy_in(r, off, zeros, len);
}

void pv_ring_copy_out(const pv_ring *r, uint32_t off, uint32_t len, uint8_t *out)
{
    size_t first;
    if (r->size == 0 || len > r->size)
        return;
    off %= r->size;
    first = r->size - off;
    if (len <= first) {
        memcpy(out, r->data + off, len);
    } else {
        memcpy(out, r->data + off, first);
        memcpy(out + first, r->data, len - first);
    }
}

int pv_ring_attach(pv_ring *r, uint8_t *base, size_t len, int format)
{
    uint32_t w, rd;
    memset(r, 0, sizeof(*r));
    if (base == NULL || ((uintptr_t)base & 7u) != 0)
        return PV_BAD_ARGUMENT;
    if (len <= PV_CONTROL_SIZE || (len - PV_CONTROL_SIZE) % PV_PAGE_SIZE != 0 ||
        len - PV_CONTROL_SIZE > 0x80000000u)
        return PV_BAD_ARGUMENT;
    r->ctl = (struct pv_ring_control *)base;
    r->data = base + PV_CONTROL_SIZE;
    r->size = (uint32_t)(len - PV_CONTROL_SIZE);
    if (format) {
        /* The creator formats the page before anyone else can see it (the
         * fd or GPADL is handed over afterwards), so plain stores do. */
        memset(r->ctl, 0, PV_CONTROL_SIZE);
        r->ctl->feature_bits = PV_FEAT_PENDING_SEND_SZ;
    }
    w = load_acquire(&r->ctl->write_index);
    rd = load_acquire(&r->ctl->read_index);
    if (!index_ok(r, w) || !index_ok(r, rd)) {
        /* Corrupt from the start; every later call reports it. */
        corrupt(r, PV_CORRUPT_INDEX, index_ok(r, w) ? rd : w);
        return PV_CORRUPT;
    }
    r->write_published = r->write_staged = w;
    r->read_published = r->read_staged = rd;
    return PV_OK;
}

/* ---- producer ------------------------------------------------------- */

/* The consumer's read index, validated.  Acquire pairs with the consumer's
 * release store in pv_ring_commit_read: once we see its index move, its
 * reads of the bytes it freed are finished and we may overwrite them. */
static int peer_read_index(pv_ring *r, uint32_t *out)
{
    uint32_t rd = load_acquire(&r->ctl->read_index);
    if (!index_ok(r, rd))
        return corrupt(r, PV_CORRUPT_INDEX, rd);
    *out = rd;
    return PV_OK;
}

int pv_ring_write(pv_ring *r, uint16_t type, uint16_t flags, uint64_t trans_id,
                  const uint8_t *header, uint32_t header_len,
                  const pv_iov *iov, uint32_t niov, uint32_t *needed)
{
    uint64_t payload = 0, padded, packet_len, total;
    uint32_t rd, w, i, start;
    struct pv_packet_descriptor desc;
    uint64_t trailer;
    int rc;

    if (r->corrupt_reason != PV_CORRUPT_NONE)
        return PV_CORRUPT;
    if ((header_len & 7u) != 0 || (header_len > 0 && header == NULL))
        return PV_BAD_ARGUMENT;
    for (i = 0; i < niov; i++)
        payload += iov[i].len;
    padded = (payload + 7u) & ~(uint64_t)7u;
    packet_len = PV_DESC_SIZE + (uint64_t)header_len + padded;
    total = packet_len + PV_TRAILER_SIZE;
    *needed = total > 0xffffffffu ? 0xffffffffu : (uint32_t)total;
    /* A ring is never filled completely, so the most it can ever take is
     * size - 8 bytes (packet + trailer); len8 is a u16 besides. */
    if (packet_len / 8 > PV_MAX_LEN8 || total > (uint64_t)r->size - 8)
        return PV_TOO_LARGE;

    w = r->write_staged;
    if ((rc = peer_read_index(r, &rd)) != PV_OK)
        return rc;
    /* Strictly greater: writing exactly the free space would make
     * write_index == read_index, which reads as "empty". */
    if (bytes_to_write(r, w, rd) <= total) {
        uint64_t staged = distance(r, r->write_published, w);
        uint64_t want = staged + total;
        *needed = want > 0xffffffffu ? 0xffffffffu : (uint32_t)want;
        r->full_events++;
        return PV_FULL;
    }

    start = w;
    desc.type = type;
    desc.offset8 = (uint16_t)((PV_DESC_SIZE + header_len) / 8);
    desc.len8 = (uint16_t)(packet_len / 8);
    desc.flags = flags;
    desc.trans_id = trans_id;
    w = copy_in(r, w, (const uint8_t *)&desc, sizeof(desc));
    if (header_len)
        w = copy_in(r, w, header, header_len);
    for (i = 0; i < niov; i++)
        if (iov[i].len)
            w = copy_in(r, w, iov[i].base, iov[i].len);
    if (padded != payload)
        w = zero_in(r, w, (size_t)(padded - payload));
    trailer = (uint64_t)start << 32;
    w = copy_in(r, w, (const uint8_t *)&trailer, sizeof(trailer));

    r->write_staged = w;
    r->packets++;
    r->bytes += total;
    if (r->pending_armed) {
        /* Like Linux after a successful write: we are no longer blocked. */
        store_relaxed(&r->ctl->pending_send_sz, 0);
        r->pending_armed = 0;
    }
    return PV_OK;
}

int pv_ring_write1(pv_ring *r, uint16_t type, uint16_t flags, uint64_t trans_id,
                   const char *buf, size_t len, uint32_t *needed)
{
    pv_iov iov;
    iov.base = (const uint8_t *)buf;
    iov.len = len;
    return pv_ring_write(r, type, flags, trans_id, NULL, 0, &iov, 1, needed);
}

int pv_ring_send1(pv_ring *r, uint16_t type, uint16_t flags, uint64_t trans_id,
                  const char *buf, size_t len, uint32_t *needed)
{
    int rc = pv_ring_write1(r, type, flags, trans_id, buf, len, needed);
    return rc != PV_OK ? -rc : pv_ring_commit_write(r);
}

int pv_ring_write_many(pv_ring *r, uint16_t type, uint16_t flags, uint64_t trans_id0,
                       const uint8_t *payloads, const uint32_t *lens, uint32_t n,
                       uint32_t *written, uint32_t *needed)
{
    uint32_t i;
    size_t off = 0;
    pv_iov iov;
    int rc = PV_OK;
    for (i = 0; i < n; i++) {
        iov.base = payloads + off;
        iov.len = lens[i];
        rc = pv_ring_write(r, type, flags, trans_id0 + i, NULL, 0, &iov, 1, needed);
        if (rc != PV_OK)
            break;
        off += lens[i];
    }
    *written = i;
    return rc;
}

int pv_ring_commit_write(pv_ring *r)
{
    uint32_t old = r->write_published, mask, rd;
    if (r->corrupt_reason != PV_CORRUPT_NONE)
        return -PV_CORRUPT;
    if (r->write_staged == old)
        return 0;
    /* Release: every byte of the staged packets becomes visible before the
     * index that covers them; the consumer's acquire load of write_index
     * pairs with this (it must never see the index before the bytes). */
    store_release(&r->ctl->write_index, r->write_staged);
    r->write_published = r->write_staged;
    r->commits++;
    /* Full fence, store -> load: our index store must be visible before we
     * sample interrupt_mask and read_index.  Without it the consumer could
     * clear its mask and re-check (seeing the old index: empty) while we
     * still read its old mask = 1 and skip the signal -- a lost wake-up. */
    atomic_thread_fence(memory_order_seq_cst);
    mask = load_relaxed(&r->ctl->interrupt_mask);
    /* Acquire orders the read_index load after the mask load (Linux's
     * virt_rmb between them in hv_signal_on_write). */
    rd = load_acquire(&r->ctl->read_index);
    if (!index_ok(r, rd))
        return -corrupt(r, PV_CORRUPT_INDEX, rd);
    if (mask == 0 && rd == old) {
        r->signals++;
        return 1;
    }
    return 0;
}

void pv_ring_revert_write(pv_ring *r)
{
    r->write_staged = r->write_published;
}

int64_t pv_ring_write_space(pv_ring *r)
{
    uint32_t rd;
    if (r->corrupt_reason != PV_CORRUPT_NONE || peer_read_index(r, &rd) != PV_OK)
        return -PV_CORRUPT;
    return (int64_t)bytes_to_write(r, r->write_staged, rd);
}

int pv_ring_arm_pending_send(pv_ring *r, uint32_t needed)
{
    uint32_t rd, want;
    if (r->corrupt_reason != PV_CORRUPT_NONE)
        return -PV_CORRUPT;
    if (r->write_staged != r->write_published)
        return -PV_BAD_ARGUMENT;   /* commit first: the consumer sees only published bytes */
    want = (needed + 7u) & ~7u;
    if (needed == 0 || needed > r->size - 8 || want > r->size - 8)
        return -PV_TOO_LARGE;
    store_relaxed(&r->ctl->pending_send_sz, want);
    r->pending_armed = 1;
    /* Full fence, store -> load: pending_send_sz must be visible before we
     * re-read read_index.  Otherwise the consumer could free the space and
     * sample pending_send_sz == 0 in between, and neither side acts: we
     * sleep on a signal that never comes. */
    atomic_thread_fence(memory_order_seq_cst);
    if (peer_read_index(r, &rd) != PV_OK)
        return -PV_CORRUPT;
    return bytes_to_write(r, r->write_published, rd) > want ? 1 : 0;
}

void pv_ring_clear_pending_send(pv_ring *r)
{
    store_relaxed(&r->ctl->pending_send_sz, 0);
    r->pending_armed = 0;
}

/* ---- consumer ------------------------------------------------------- */

/* The producer's write index, validated.  Acquire pairs with the release
 * store in pv_ring_commit_write: packet bytes are read only after it. */
static int peer_write_index(pv_ring *r, uint32_t *out)
{
    uint32_t w = load_acquire(&r->ctl->write_index);
    if (!index_ok(r, w))
        return corrupt(r, PV_CORRUPT_INDEX, w);
    *out = w;
    return PV_OK;
}

/* Validate the packet at read_staged without taking it. */
int pv_ring_peek(pv_ring *r, pv_packet *pkt)
{
    uint32_t w, avail, len, hdr;
    struct pv_packet_descriptor desc;
    int rc;

    if (r->corrupt_reason != PV_CORRUPT_NONE)
        return PV_CORRUPT;
    if ((rc = peer_write_index(r, &w)) != PV_OK)
        return rc;
    avail = distance(r, r->read_staged, w);
    if (avail == 0)
        return PV_EMPTY;
    if (avail < PV_DESC_SIZE + PV_TRAILER_SIZE)
        return corrupt(r, PV_CORRUPT_SHORT, avail);
    /* One fetch of the descriptor into private memory; only this copy is
     * checked and used (a second read could see different values). */
    pv_ring_copy_out(r, r->read_staged, sizeof(desc), (uint8_t *)&desc);
    len = (uint32_t)desc.len8 * 8u;
    hdr = (uint32_t)desc.offset8 * 8u;
    if (desc.offset8 < 2 || desc.offset8 > desc.len8)
        return corrupt(r, PV_CORRUPT_OFFSET8, desc.offset8);
    if ((uint64_t)len + PV_TRAILER_SIZE > avail)
        return corrupt(r, PV_CORRUPT_LENGTH, desc.len8);
    switch (desc.type) {
    case PV_PKT_DATA_INBAND:
    case PV_PKT_DATA_USING_XFER_PAGES:
    case PV_PKT_DATA_USING_GPA_DIRECT:
    case PV_PKT_COMP:
        break;
    default:
        return corrupt(r, PV_CORRUPT_TYPE, desc.type);
    }
    if ((desc.flags & ~PV_FLAG_COMPLETION_REQUESTED) != 0)
        return corrupt(r, PV_CORRUPT_FLAGS, desc.flags);
    pkt->type = desc.type;
    pkt->flags = desc.flags;
    pkt->header_len = hdr;
    pkt->packet_len = len;
    pkt->trans_id = desc.trans_id;
    pkt->ring_offset = r->read_staged;
    pkt->out_offset = 0;
    return PV_OK;
}

void pv_ring_take(pv_ring *r, const pv_packet *pkt)
{
    r->read_staged = wrap(r, (uint64_t)pkt->ring_offset + pkt->packet_len + PV_TRAILER_SIZE);
    r->packets++;
    r->bytes += pkt->packet_len + PV_TRAILER_SIZE;
}

int pv_ring_next(pv_ring *r, pv_packet *pkt)
{
    int rc = pv_ring_peek(r, pkt);
    if (rc == PV_OK)
        pv_ring_take(r, pkt);
    return rc;
}

int pv_ring_poll_next(pv_ring *r, uint32_t spins, pv_packet *pkt)
{
    int64_t avail = pv_ring_poll(r, spins);
    if (avail < 0)
        return PV_CORRUPT;
    if (avail == 0)
        return PV_EMPTY;
    return pv_ring_next(r, pkt);
}

int pv_ring_read_many(pv_ring *r, uint8_t *out, size_t cap, int payload_only,
                      pv_packet *pkts, uint32_t max, uint32_t *n, size_t *used)
{
    uint32_t count = 0;
    size_t off = 0;
    int rc = PV_OK;
    while (count < max) {
        pv_packet *p = &pkts[count];
        uint32_t skip, len;
        rc = pv_ring_peek(r, p);
        if (rc != PV_OK)
            break;
        skip = payload_only ? p->header_len : 0;
        len = p->packet_len - skip;
        if (len > cap - off) {
            rc = count ? PV_OK : PV_NO_SPACE;
            break;
        }
        pv_ring_copy_out(r, p->ring_offset + skip, len, out + off);
        p->out_offset = (uint32_t)off;
        off += len;
        pv_ring_take(r, p);
        count++;
    }
    *n = count;
    *used = off;
    if (count > 0 && rc == PV_EMPTY)
        rc = PV_OK;
    return rc;
}

int pv_ring_commit_read(pv_ring *r)
{
    uint32_t start = r->read_published, pending, w;
    int64_t free_now, freed;
    if (r->corrupt_reason != PV_CORRUPT_NONE)
        return -PV_CORRUPT;
    if (r->read_staged == start)
        return 0;
    /* Release: all our reads of the packets we are giving back are done
     * before the index moves; the producer may overwrite them as soon as
     * it sees the new index (its acquire load in peer_read_index). */
    store_release(&r->ctl->read_index, r->read_staged);
    r->read_published = r->read_staged;
    r->commits++;
    /* A producer that never set the feature bit polls; never signal it. */
    if ((load_relaxed(&r->ctl->feature_bits) & PV_FEAT_PENDING_SEND_SZ) == 0)
        return 0;
    /* Full fence, store -> load: the new read_index must be visible before
     * we sample pending_send_sz.  Otherwise a producer could check the old
     * index, find the ring full, arm pending_send_sz after our read of it
     * and sleep, while we saw 0 and skipped the signal. */
    atomic_thread_fence(memory_order_seq_cst);
    pending = load_relaxed(&r->ctl->pending_send_sz);
    if (pending == 0)
        return 0;
    /* Some producers ask for "size - 1" to mean "wake me when empty";
     * dropping the low bits makes that satisfiable (openvmm commit_read). */
    pending &= ~7u;
    /* Acquire: the write_index load stays after the pending load (Linux's
     * virt_rmb between them in hv_pkt_iter_close). */
    if (peer_write_index(r, &w) != PV_OK)
        return -PV_CORRUPT;
    free_now = bytes_to_write(r, w, r->read_published);
    freed = distance(r, start, r->read_published);
    /* There was already enough room before this commit: the producer was
     * not waiting on us. */
    if (free_now - freed > (int64_t)pending)
        return 0;
    /* Still not enough; an exact fit counts as not enough (see top). */
    if (free_now <= (int64_t)pending)
        return 0;
    r->signals++;
    return 1;
}

int64_t pv_ring_read_available(pv_ring *r)
{
    uint32_t w;
    if (r->corrupt_reason != PV_CORRUPT_NONE || peer_write_index(r, &w) != PV_OK)
        return -PV_CORRUPT;
    return (int64_t)distance(r, r->read_staged, w);
}

void pv_ring_mask(pv_ring *r)
{
    store_relaxed(&r->ctl->interrupt_mask, 1);
    /* Full fence: the producer must see the mask before we go on draining
     * so that it stops signalling (an optimisation only: a late-seen mask
     * costs one spurious signal, never a lost one). */
    atomic_thread_fence(memory_order_seq_cst);
}

int64_t pv_ring_unmask(pv_ring *r)
{
    store_relaxed(&r->ctl->interrupt_mask, 0);
    /* Full fence, store -> load: the cleared mask must be visible before
     * we re-read write_index.  A producer that committed while we were
     * masked did not signal; this re-check is the only way we learn of its
     * packets (Linux hv_end_read). */
    atomic_thread_fence(memory_order_seq_cst);
    return pv_ring_read_available(r);
}

int64_t pv_ring_poll(pv_ring *r, uint32_t spins)
{
    uint32_t i;
    int64_t avail = 0;
    for (i = 0; i <= spins; i++) {
        avail = pv_ring_read_available(r);
        if (avail != 0)
            return avail;
        cpu_relax();
    }
    return avail;
}

static uint64_t monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int pv_ring_poll_many(pv_ring *const *rings, uint32_t n, uint32_t usec)
{
    uint64_t deadline = monotonic_ns() + (uint64_t)usec * 1000u;
    uint32_t i, spin;
    /* The clock is read every 16 rounds: a read costs about as much as
     * the rounds themselves. */
    do {
        for (spin = 0; spin < 16; spin++) {
            for (i = 0; i < n; i++)
                if (pv_ring_read_available(rings[i]) != 0)
                    return (int)i;
            cpu_relax();
        }
    } while (monotonic_ns() < deadline);
    return -1;
}
