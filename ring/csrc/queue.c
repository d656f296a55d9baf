/* queue.c -- the wake-up sequence of a queue, once per side.
 *
 * The rules (docs/vmbus-reference section 1.7, as Linux hv_begin_read /
 * hv_end_read and openvmm's vmbus_ring do them):
 *
 *  - A consumer masks its inbound interrupt while it drains and while it
 *    polls: a producer then publishes without signalling.  It drains until
 *    the ring is empty, commits what it took, and only then clears the mask
 *    and re-checks (pv_ring_unmask).  Data found by the re-check raised no
 *    signal, so the consumer drains again instead of sleeping.
 *  - The re-check comes after the consumer's own commit: a producer that
 *    publishes while taken packets are still uncommitted sees a non-empty
 *    ring and does not signal (the empty -> non-empty rule), so only a look
 *    after the commit can find its packet.
 *  - A producer publishes a batch with one commit and signals only when
 *    that commit says so; a consumer's commit signals a producer blocked on
 *    pending_send_sz only when it says so.
 *  - A producer short of room arms pending_send_sz, re-checks (the arm
 *    does), and sleeps only if there is still no room.
 *
 * pv_serve is the host's consumer of requests and producer of answers; the
 * guest's half (mask before publishing what it will poll, the last poller
 * re-checks after each reap) is vmbus/queue.py over pv_stage / pv_reap.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "ring.h"
#include "queue.h"

#define DEFAULT_BATCH 256

static inline void cpu_pause(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static int stop_requested(pv_server *s)
{
    /* Relaxed is enough: `stop` carries no data, and stop_fd wakes a
     * sleeping serve with the system call's own ordering. */
    return __atomic_load_n(&s->stop, __ATOMIC_RELAXED);
}

/* Reset the kick eventfd's counter; never blocks.  The peer holds the same
 * open file description, so it can clear O_NONBLOCK on it, and it can drain
 * the counter between our poll and our read: a plain read(2) would then
 * sleep with nobody to wake it (and a serving thread must stop on request,
 * before shared memory is unmapped).  RWF_NOWAIT makes "do not block" a
 * property of this one call (eventfd honours it since Linux 5.12); on an
 * older kernel the poll that just said "readable" is all we have. */
static int take_kick(int fd)
{
    uint64_t count;
    struct iovec iov = {&count, sizeof count};
    ssize_t n = preadv2(fd, &iov, 1, -1, RWF_NOWAIT);

    if (n < 0 && errno == EOPNOTSUPP) {
        struct pollfd pfd = {fd, POLLIN, 0};
        if (poll(&pfd, 1, 0) == 1 && pfd.revents & POLLIN)
            n = read(fd, &count, sizeof count);
    }
    return n == (ssize_t)sizeof count;
}

/* Sleep until the peer signals or the owner stops us. */
static int sleep_on_kick(pv_server *s)
{
    struct pollfd fds[2] = {{s->kick_fd, POLLIN, 0}, {s->stop_fd, POLLIN, 0}};

    if (stop_requested(s))
        return PV_SERVE_STOPPED;
    s->sleeps++;
    while (poll(fds, 2, -1) < 0)
        if (errno != EINTR)
            return PV_SERVE_STOPPED;
    if (fds[1].revents || stop_requested(s))
        return PV_SERVE_STOPPED;
    if (fds[0].revents & POLLIN && take_kick(s->kick_fd))
        s->wakeups++;
    return 0;
}

/* A commit said "signal": do it here when we own the peer's eventfd, else
 * report it.  An eventfd write can fail only on a counter a hostile peer
 * parked at its maximum; the signal is then moot (the fd is readable). */
static int signal_peer(pv_server *s)
{
    uint64_t one = 1;
    s->signals++;
    if (s->signal_fd < 0)
        return PV_SERVE_SIGNAL;
    if (write(s->signal_fd, &one, sizeof one) < 0) {
        /* nothing to do: see above */
    }
    return 0;
}

/* The answer ring is full: ask the peer to signal once `needed` free bytes
 * exist (the arm re-checks after a full fence) and sleep until then.  The
 * request ring stays as it was (masked in pv_serve): a request arriving
 * meanwhile is seen when we come back, and the room signal wakes us.  0:
 * look again; on a stop pending_send_sz stays armed (harmless: the peer
 * only signals once more). */
static int wait_room(pv_server *s, uint32_t needed)
{
    int rc;

    s->ring_full_waits++;
    rc = pv_ring_arm_pending_send(s->outbound, needed);
    if (rc < 0)
        return PV_SERVE_CORRUPT;
    if (rc == 0 && sleep_on_kick(s) == PV_SERVE_STOPPED)
        return PV_SERVE_STOPPED;
    pv_ring_clear_pending_send(s->outbound);
    return 0;
}

/* The last look found the request ring empty (it is masked): spin for
 * spin_us, then clear the mask and re-check, then sleep.  0: look again. */
static int wait_idle(pv_server *s)
{
    int64_t more;

    if (s->spin_us && pv_ring_poll_many(&s->inbound, 1, s->spin_us) >= 0) {
        s->polls_hit++;   /* more work (or a corrupt index the next peek reports) */
        return 0;
    }
    /* Clear the mask, full fence, re-check (ring.c): anything published
     * while we were masked raised no signal. */
    more = pv_ring_unmask(s->inbound);
    if (more < 0)
        return PV_SERVE_CORRUPT;
    if (more > 0)
        return 0;
    return sleep_on_kick(s);
}

int pv_serve(pv_server *s)
{
    uint32_t batch_max = s->batch_max ? s->batch_max : DEFAULT_BATCH;

    for (;;) {
        int result = 0, rc, no_room = 0;
        uint32_t served = 0;

        if (stop_requested(s))
            return PV_SERVE_STOPPED;
        /* Masked while draining: the peer need not signal packets we are
         * about to see anyway (wait_idle re-checks before we sleep).
         * pv_ring_mask fences, so the peer sees it before we read on. */
        pv_ring_mask(s->inbound);
        while (served < batch_max) {
            pv_packet pkt;
            rc = pv_ring_peek(s->inbound, &pkt);
            if (rc == PV_EMPTY)
                break;
            if (rc != PV_OK) {
                result |= PV_SERVE_CORRUPT;
                break;
            }
            rc = s->handle(s->ctx, s->inbound, &pkt, s->outbound);
            if (rc == PV_HANDLED || rc == PV_HANDLED_PUBLISH) {
                pv_ring_take(s->inbound, &pkt);
                served++;
                s->served++;
                if (rc == PV_HANDLED_PUBLISH)
                    break;   /* the peer may be waiting for just this one */
                continue;
            }
            /* Not taken: the next reader (Python, or us once there is
             * room) finds it at the head and validates it afresh. */
            if (rc == PV_NO_ROOM) {
                no_room = 1;
            } else {
                s->punted++;
                result |= PV_SERVE_PUNT;
            }
            break;
        }
        /* Publish the answers first, then free the request space: each
         * commit makes its own signalling decision, with its own fences
         * (ring.c).  Answers first, so a peer woken for room finds them. */
        rc = pv_ring_commit_write(s->outbound);
        if (rc < 0)
            return result | PV_SERVE_CORRUPT;
        if (rc == 1)
            result |= signal_peer(s);
        if (served)
            s->publishes++;
        rc = pv_ring_commit_read(s->inbound);
        if (rc < 0)
            return result | PV_SERVE_CORRUPT;
        if (rc == 1)
            result |= signal_peer(s);
        if (result)
            return result;
        if (no_room)
            rc = wait_room(s, s->room_needed ? s->room_needed : 64);
        else if (served)
            rc = 0;   /* drained a batch: look again before anything else */
        else
            rc = wait_idle(s);
        if (rc)
            return rc;
    }
}

int pv_wait_readable(pv_server *s)
{
    for (;;) {
        int64_t avail;
        int rc;

        if (stop_requested(s))
            return PV_SERVE_STOPPED;
        pv_ring_mask(s->inbound);   /* fenced: see pv_serve */
        avail = pv_ring_read_available(s->inbound);
        if (avail < 0)
            return PV_SERVE_CORRUPT;
        if (avail > 0)
            return 0;
        rc = wait_idle(s);
        if (rc)
            return rc;
    }
}

int pv_wait_writable(pv_server *s, uint32_t needed)
{
    for (;;) {
        int64_t space = pv_ring_write_space(s->outbound);
        int rc;

        if (space < 0)
            return PV_SERVE_CORRUPT;
        if (space > needed)
            return 0;
        if (stop_requested(s))
            return PV_SERVE_STOPPED;
        rc = wait_room(s, needed);
        if (rc)
            return rc;
    }
}

uint32_t pv_unpublished(const pv_ring *out)
{
    /* Both indices are our own private copies (ring.h): no ordering needed. */
    return out->write_staged >= out->write_published ? out->write_staged - out->write_published
                                                     : out->size - out->write_published + out->write_staged;
}

int pv_echo_handler(void *ctx, pv_ring *in, const pv_packet *pkt, pv_ring *out)
{
    uint8_t buf[512];
    uint32_t len = pkt->packet_len - pkt->header_len, needed;
    pv_iov iov;
    int rc;

    if (!(pkt->flags & PV_FLAG_COMPLETION_REQUESTED))
        return PV_HANDLED;
    if (ctx != NULL) {
        pv_echo_pacing *pace = ctx;
        uint32_t x = pace->state ? pace->state : 1, i;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        pace->state = x;
        for (i = 0; pace->max_spins && i < x % (pace->max_spins + 1); i++)
            cpu_pause();
    }
    if (len > sizeof buf)
        return PV_NOT_MINE;   /* large echoes are Python's (none in the tests) */
    pv_ring_copy_out(in, pkt->ring_offset + pkt->header_len, len, buf);
    iov.base = buf;
    iov.len = len;
    rc = pv_ring_write(out, PV_PKT_COMP, 0, pkt->trans_id, NULL, 0, &iov, 1, &needed);
    if (rc == PV_FULL)
        return PV_NO_ROOM;
    return rc == PV_OK ? PV_HANDLED : PV_NOT_MINE;
}

int pv_stage(pv_ring *out, pv_builder build, void *ctx, const void *items, size_t item_size, uint32_t n,
             uint32_t *staged, uint32_t *needed)
{
    const uint8_t *item = items;
    uint32_t i;
    int rc = PV_OK;

    *staged = 0;
    for (i = 0; i < n; i++, item += item_size) {
        rc = build(ctx, item, out, needed);
        if (rc != PV_OK)
            break;
        (*staged)++;
    }
    return rc;
}

int pv_reap(pv_ring *in, pv_decoder decode, void *ctx, void *slots, size_t slot_size, uint32_t max, uint32_t *n)
{
    uint8_t *slot = slots;
    uint32_t count = 0;
    int rc = PV_OK;

    while (count < max) {
        pv_packet pkt;
        rc = pv_ring_peek(in, &pkt);
        if (rc != PV_OK)
            break;
        decode(ctx, in, &pkt, slot);
        pv_ring_take(in, &pkt);
        slot += slot_size;
        count++;
    }
    *n = count;
    if (count > 0 && rc == PV_EMPTY)
        rc = PV_OK;
    return rc;
}

int pv_echo_decoder(void *ctx, pv_ring *in, const pv_packet *pkt, void *slot)
{
    pv_echo_reply *r = slot;
    uint32_t len = pkt->packet_len - pkt->header_len;

    (void)ctx;
    r->trans_id = pkt->trans_id;
    r->type = pkt->type;
    r->first_word = 0;
    pv_ring_copy_out(in, pkt->ring_offset + pkt->header_len, len < 8 ? len : 8, (uint8_t *)&r->first_word);
    return 0;
}

static int build_counted(void *ctx, const void *item, pv_ring *out, uint32_t *needed)
{
    const uint64_t *tid = item;
    (void)ctx;
    return pv_ring_write1(out, PV_PKT_DATA_INBAND, PV_FLAG_COMPLETION_REQUESTED, *tid, (const char *)tid,
                          sizeof *tid, needed);
}

int pv_stage_counted(pv_ring *out, uint64_t trans_id0, uint32_t n, uint32_t *staged, uint32_t *needed)
{
    uint64_t tids[256];
    uint32_t i, done = 0;
    int rc = PV_OK;

    *staged = 0;
    while (done < n && rc == PV_OK) {
        uint32_t chunk = n - done < 256 ? n - done : 256, got;
        for (i = 0; i < chunk; i++)
            tids[i] = trans_id0 + done + i;
        rc = pv_stage(out, build_counted, NULL, tids, sizeof tids[0], chunk, &got, needed);
        done += got;
    }
    *staged = done;
    return rc;
}

int pv_echo_reap(pv_ring *in, pv_echo_reply *replies, uint32_t max, uint32_t *n)
{
    return pv_reap(in, pv_echo_decoder, NULL, replies, sizeof *replies, max, n);
}
