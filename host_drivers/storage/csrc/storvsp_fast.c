/* storvsp_fast.c -- the storvsp's regular requests, served without Python.
 *
 * What counts as regular is deliberately narrow: an EXECUTE_SRB asking for
 * a completion, carried GPA-direct with exactly one range, for disk 0:0:0,
 * whose CDB is READ or WRITE 10/16 with a direction that agrees with the
 * SRB, a transfer of 1..max_transfer bytes equal to the CDB's block count,
 * inside the disk, and (for a write) a writable disk.  Everything is checked
 * on a private copy of the packet; the page list becomes iovecs through
 * pv_guest_iovec (the same rules as the Python GuestMemory.iovec).  Any
 * other request, and any I/O that fails or comes up short, is handed back
 * unread (SVQ_PUNT): the Python path redoes it and answers with the right
 * sense data.  Redoing is safe because a read or a write of the same bytes
 * to the same place is idempotent; flushes are never done here, so a failed
 * fdatasync is never retried into a false success.
 *
 * The completion is the request's SRB echoed with SUCCESS, GOOD, no sense
 * and the bytes moved: byte for byte what the Python path writes.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "ring.h"
#include "storvsc_wire.h"
#include "guest_pages.h"
#include "storvsp_fast.h"

#define BATCH_MAX 256                    /* requests between two publishes */
/* Bytes moved between two publishes.  Small requests complete in batches
 * (one index store, at most one signal for many), but a guest waiting on a
 * large transfer should not also wait for the ones queued behind it: with
 * two lanes of 2 x 1 MiB each, publishing per batch held every completion
 * until all four copies were done, and the guest's resubmission then found
 * this thread idle (measured: a third of both CPUs idle at 1 MiB QD4). */
#define PUBLISH_BYTES (256u << 10)
#define MAX_IOV SV_MAX_PAGES              /* the largest transfer, starting inside a page */
#define PACKET_MAX (PV_DESC_SIZE + sizeof(struct sv_gpa_head) + 8 * SV_MAX_PAGES + SV_PACKET_SIZE + 64)
#define IOV_PER_CALL 1024                /* Linux's IOV_MAX: a longer list goes in several calls */
#define COMPLETION_BYTES (PV_DESC_SIZE + SV_PACKET_SIZE + PV_TRAILER_SIZE)

enum { SERVED, NOT_REGULAR, NO_ROOM };

static uint32_t be32(const uint8_t *p) { return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]; }
static uint64_t be64(const uint8_t *p) { return (uint64_t)be32(p) << 32 | be32(p + 4); }

static int stop_requested(storvsp_queue *q)
{
    /* Relaxed is enough: `stop` carries no data, and stop_fd wakes a
     * sleeping serve with the system call's own ordering. */
    return __atomic_load_n(&q->stop, __ATOMIC_RELAXED);
}

/* Decode a READ/WRITE 10/16 CDB; 0 if it is not one (or too short). */
static int decode_rw(const struct sv_srb *srb, int *write, int *fua, uint64_t *lba, uint32_t *blocks)
{
    const uint8_t *cdb = srb->cdb;
    switch (cdb[0]) {
    case SV_READ_10:
    case SV_WRITE_10:
        if (srb->cdb_length < 10)
            return 0;
        *lba = be32(cdb + 2);
        *blocks = (uint32_t)cdb[7] << 8 | cdb[8];
        break;
    case SV_READ_16:
    case SV_WRITE_16:
        if (srb->cdb_length < 16)
            return 0;
        *lba = be64(cdb + 2);
        *blocks = be32(cdb + 10);
        break;
    default:
        return 0;
    }
    *write = cdb[0] == SV_WRITE_10 || cdb[0] == SV_WRITE_16;
    *fua = (cdb[1] & SV_CDB_FUA) != 0;
    return 1;
}

/* preadv/pwritev2 until every byte moved; 0 on success, -1 to punt. */
static int move_all(storvsp_queue *q, int write, int fua, struct iovec *iov, int n, off_t offset)
{
    while (n > 0) {
        int count = n < IOV_PER_CALL ? n : IOV_PER_CALL;
        ssize_t got = write ? pwritev2(q->disk_fd, iov, count, offset, fua ? RWF_DSYNC : 0)
                            : preadv(q->disk_fd, iov, count, offset);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            return -1;   /* an error or end of file: the Python path reports it */
        offset += got;
        while (n > 0 && (size_t)got >= iov->iov_len) {
            got -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + got;
            iov->iov_len -= (size_t)got;
        }
    }
    return 0;
}

static int serve_one(storvsp_queue *q, const pv_packet *pkt)
{
    uint8_t buf[PACKET_MAX] __attribute__((aligned(8)));
    struct sv_packet vp;
    struct sv_gpa_head head;
    struct iovec iov[MAX_IOV];
    const uint64_t *pfns;
    uint64_t lba;
    uint32_t blocks, transfer, npfns;
    int write, fua, niov;
    pv_iov reply;
    uint32_t needed;

    if (pkt->type != PV_PKT_DATA_USING_GPA_DIRECT || !(pkt->flags & PV_FLAG_COMPLETION_REQUESTED))
        return NOT_REGULAR;
    if (pkt->packet_len > sizeof buf || pkt->packet_len < pkt->header_len + SV_PACKET_SIZE ||
        pkt->header_len < PV_DESC_SIZE + sizeof head + 8)
        return NOT_REGULAR;
    /* One private copy; every check below reads only the copy. */
    pv_ring_copy_out(q->inbound, pkt->ring_offset, pkt->packet_len, buf);
    memcpy(&vp, buf + pkt->header_len, sizeof vp);
    memcpy(&head, buf + PV_DESC_SIZE, sizeof head);

    if (vp.operation != SV_OP_EXECUTE_SRB || vp.srb.cdb_length == 0 || vp.srb.cdb_length > 16)
        return NOT_REGULAR;
    if (vp.srb.path || vp.srb.target || vp.srb.lun)
        return NOT_REGULAR;
    transfer = vp.srb.data_transfer_length;
    if (transfer == 0 || transfer > q->max_transfer)
        return NOT_REGULAR;
    if (!decode_rw(&vp.srb, &write, &fua, &lba, &blocks))
        return NOT_REGULAR;
    if (write == (vp.srb.data_in == SV_DATA_IN) || (write && q->read_only))
        return NOT_REGULAR;
    if (lba > q->blocks || blocks > q->blocks - lba || (uint64_t)blocks * q->block_size != transfer)
        return NOT_REGULAR;
    if (head.range_count != 1 || head.byte_count < transfer)
        return NOT_REGULAR;
    /* The PFNs follow the head in the private copy (8-aligned there). */
    pfns = (const uint64_t *)(buf + PV_DESC_SIZE + sizeof head);
    npfns = (pkt->header_len - PV_DESC_SIZE - sizeof head) / 8;
    niov = pv_guest_iovec(q->ram, q->ram_pages, pfns, npfns, head.byte_offset, transfer, iov, MAX_IOV);
    if (niov < 0)
        return NOT_REGULAR;

    /* Room for the completion before the I/O, so a served request is
     * always answered (free space must exceed it: a ring is never full). */
    if (pv_ring_write_space(q->outbound) <= COMPLETION_BYTES)
        return NO_ROOM;
    if (move_all(q, write, fua, iov, niov, (off_t)(lba * q->block_size)) < 0)
        return NOT_REGULAR;

    vp.operation = SV_OP_COMPLETE_IO;
    vp.flags = SV_REQUEST_COMPLETION_FLAG;
    vp.status = 0;
    vp.srb.srb_status = SV_SRB_STATUS_SUCCESS;
    vp.srb.scsi_status = 0;
    vp.srb.sense_info_length = 0;
    vp.srb.data_transfer_length = transfer;
    memset(vp.srb.cdb, 0, sizeof vp.srb.cdb);
    reply.base = (const uint8_t *)&vp;
    reply.len = sizeof vp;
    if (pv_ring_write(q->outbound, PV_PKT_COMP, 0, pkt->trans_id, NULL, 0, &reply, 1, &needed) != PV_OK)
        return NO_ROOM;   /* cannot happen after the space check; redoing the I/O is harmless */
    q->requests++;
    if (write)
        q->bytes_written += transfer;
    else
        q->bytes_read += transfer;
    return SERVED;
}

/* Reset the kick eventfd's counter; never blocks.  The guest holds the same
 * open file description, so it can clear O_NONBLOCK on it, and it can drain
 * the counter between our poll and our read: a plain read(2) would then
 * sleep with nobody to wake it (and this thread must stop on request,
 * before guest RAM is unmapped).  RWF_NOWAIT makes "do not block" a
 * property of this one call (eventfd honours it since Linux 5.12); on an
 * older kernel the poll that just said "readable" is all we have. */
static int take_kick(int fd, uint64_t *count)
{
    struct iovec iov = {count, sizeof *count};
    ssize_t n = preadv2(fd, &iov, 1, -1, RWF_NOWAIT);

    if (n < 0 && errno == EOPNOTSUPP) {
        struct pollfd pfd = {fd, POLLIN, 0};
        if (poll(&pfd, 1, 0) == 1 && pfd.revents & POLLIN)
            n = read(fd, count, sizeof *count);
    }
    return n == (ssize_t)sizeof *count;
}

/* Sleep until the guest signals or the owner stops us. */
static int sleep_on_kick(storvsp_queue *q)
{
    struct pollfd fds[2] = {{q->kick_fd, POLLIN, 0}, {q->stop_fd, POLLIN, 0}};
    uint64_t count;

    if (stop_requested(q))
        return SVQ_STOPPED;
    while (poll(fds, 2, -1) < 0)
        if (errno != EINTR)
            return SVQ_STOPPED;
    if (fds[1].revents || stop_requested(q))
        return SVQ_STOPPED;
    if (fds[0].revents & POLLIN && take_kick(q->kick_fd, &count))
        q->wakeups++;
    return 0;
}

int storvsp_serve(storvsp_queue *q)
{
    for (;;) {
        int result = 0, rc, no_room = 0;
        uint32_t served = 0;
        uint64_t moved_before = q->bytes_read + q->bytes_written;

        if (stop_requested(q))
            return SVQ_STOPPED;
        /* Masked while draining: the guest need not signal packets we are
         * about to see anyway (pv_ring_unmask re-checks before we sleep). */
        pv_ring_mask(q->inbound);
        while (served < BATCH_MAX) {
            pv_packet pkt;
            rc = pv_ring_peek(q->inbound, &pkt);
            if (rc == PV_EMPTY)
                break;
            if (rc != PV_OK) {
                result |= SVQ_CORRUPT;
                break;
            }
            rc = serve_one(q, &pkt);
            if (rc == SERVED) {
                pv_ring_take(q->inbound, &pkt);
                served++;
                if (q->bytes_read + q->bytes_written - moved_before >= PUBLISH_BYTES)
                    break;   /* publish now: the guest may be waiting for just this one */
                continue;
            }
            /* Not taken: the next reader (Python, or us once there is
             * room) finds it at the head and validates it afresh. */
            if (rc == NOT_REGULAR) {
                q->punted++;
                result |= SVQ_PUNT;
            } else {
                no_room = 1;
            }
            break;
        }
        /* Publish completions, then free the request space; each commit
         * makes its own signalling decision (ring.c). */
        rc = pv_ring_commit_write(q->outbound);
        if (rc < 0)
            return result | SVQ_CORRUPT;
        if (rc == 1)
            result |= SVQ_SIGNAL;
        rc = pv_ring_commit_read(q->inbound);
        if (rc < 0)
            return result | SVQ_CORRUPT;
        if (rc == 1)
            result |= SVQ_SIGNAL;
        if (result)
            return result;
        if (no_room) {
            /* The guest is not taking completions: ask it to signal once
             * there is room for one, and sleep until then. */
            q->ring_full_waits++;
            rc = pv_ring_arm_pending_send(q->outbound, COMPLETION_BYTES + 8);
            if (rc < 0)
                return SVQ_CORRUPT;
            if (rc == 0 && sleep_on_kick(q) == SVQ_STOPPED)
                return SVQ_STOPPED;
            pv_ring_clear_pending_send(q->outbound);
            continue;
        }
        if (served)
            continue;
        if (q->spin_us && pv_ring_poll_many(&q->inbound, 1, q->spin_us) >= 0) {
            q->polls_hit++;   /* more work (or a corrupt index the next peek reports) */
            continue;
        }
        {
            int64_t more = pv_ring_unmask(q->inbound);
            if (more < 0)
                return SVQ_CORRUPT;
            if (more > 0)
                continue;
        }
        if (sleep_on_kick(q) == SVQ_STOPPED)
            return SVQ_STOPPED;
    }
}
