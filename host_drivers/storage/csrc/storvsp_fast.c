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
 * unread (PV_NOT_MINE): the Python path redoes it and answers with the right
 * sense data.  Redoing is safe because a read or a write of the same bytes
 * to the same place is idempotent; flushes are never done here, so a failed
 * fdatasync is never retried into a false success.
 *
 * The completion is the request's SRB echoed with SUCCESS, GOOD, no sense
 * and the bytes moved: byte for byte what the Python path writes.
 *
 * This file parses and serves one request; when to drain, publish, signal,
 * poll and sleep is the queue layer's (pv_serve, ring/csrc/queue.c).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "ring.h"
#include "queue.h"
#include "storvsc_wire.h"
#include "guest_pages.h"
#include "storvsp_fast.h"

/* Bytes moved between two publishes.  Small requests complete in batches
 * (one index store, at most one signal for many), but a guest waiting on a
 * large transfer should not also wait for the ones queued behind it: with
 * two lanes of 2 x 1 MiB each, publishing per batch held every completion
 * until all four copies were done, and the guest's resubmission then found
 * this thread idle (measured: a third of both CPUs idle at 1 MiB QD4).
 * The handler says so with PV_HANDLED_PUBLISH; smaller ones are published
 * by pv_serve per batch. */
#define PUBLISH_BYTES (256u << 10)
#define MAX_IOV SV_MAX_PAGES              /* the largest transfer, starting inside a page */
#define PACKET_MAX (PV_DESC_SIZE + sizeof(struct sv_gpa_head) + 8 * SV_MAX_PAGES + SV_PACKET_SIZE + 64)
#define IOV_PER_CALL 1024                /* Linux's IOV_MAX: a longer list goes in several calls */
#define COMPLETION_BYTES (PV_DESC_SIZE + SV_PACKET_SIZE + PV_TRAILER_SIZE)
_Static_assert(STORVSP_ROOM_NEEDED == COMPLETION_BYTES + 8, "STORVSP_ROOM_NEEDED is one completion and 8");

static uint32_t be32(const uint8_t *p) { return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]; }
static uint64_t be64(const uint8_t *p) { return (uint64_t)be32(p) << 32 | be32(p + 4); }

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
static int move_all(const storvsp_disk *d, int write, int fua, struct iovec *iov, int n, off_t offset)
{
    while (n > 0) {
        int count = n < IOV_PER_CALL ? n : IOV_PER_CALL;
        ssize_t got = write ? pwritev2(d->disk_fd, iov, count, offset, fua ? RWF_DSYNC : 0)
                            : preadv(d->disk_fd, iov, count, offset);
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

int storvsp_handle(void *ctx, pv_ring *in, const pv_packet *pkt, pv_ring *out)
{
    storvsp_disk *d = ctx;
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
        return PV_NOT_MINE;
    if (pkt->packet_len > sizeof buf || pkt->packet_len < pkt->header_len + SV_PACKET_SIZE ||
        pkt->header_len < PV_DESC_SIZE + sizeof head + 8)
        return PV_NOT_MINE;
    /* One private copy; every check below reads only the copy. */
    pv_ring_copy_out(in, pkt->ring_offset, pkt->packet_len, buf);
    memcpy(&vp, buf + pkt->header_len, sizeof vp);
    memcpy(&head, buf + PV_DESC_SIZE, sizeof head);

    if (vp.operation != SV_OP_EXECUTE_SRB || vp.srb.cdb_length == 0 || vp.srb.cdb_length > 16)
        return PV_NOT_MINE;
    if (vp.srb.path || vp.srb.target || vp.srb.lun)
        return PV_NOT_MINE;
    transfer = vp.srb.data_transfer_length;
    if (transfer == 0 || transfer > d->max_transfer)
        return PV_NOT_MINE;
    if (!decode_rw(&vp.srb, &write, &fua, &lba, &blocks))
        return PV_NOT_MINE;
    if (write == (vp.srb.data_in == SV_DATA_IN) || (write && d->read_only))
        return PV_NOT_MINE;
    if (lba > d->blocks || blocks > d->blocks - lba || (uint64_t)blocks * d->block_size != transfer)
        return PV_NOT_MINE;
    if (head.range_count != 1 || head.byte_count < transfer)
        return PV_NOT_MINE;
    /* The PFNs follow the head in the private copy (8-aligned there). */
    pfns = (const uint64_t *)(buf + PV_DESC_SIZE + sizeof head);
    npfns = (pkt->header_len - PV_DESC_SIZE - sizeof head) / 8;
    niov = pv_guest_iovec(d->ram, d->ram_pages, pfns, npfns, head.byte_offset, transfer, iov, MAX_IOV);
    if (niov < 0)
        return PV_NOT_MINE;

    /* Room for the completion before the I/O, so a served request is
     * always answered (free space must exceed it: a ring is never full). */
    if (pv_ring_write_space(out) <= COMPLETION_BYTES)
        return PV_NO_ROOM;
    if (move_all(d, write, fua, iov, niov, (off_t)(lba * d->block_size)) < 0)
        return PV_NOT_MINE;

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
    /* Nothing staged yet: the layer published everything before this
     * request, so a new run of bytes starts here. */
    if (pv_unpublished(out) == 0)
        d->unpublished_bytes = 0;
    if (pv_ring_write(out, PV_PKT_COMP, 0, pkt->trans_id, NULL, 0, &reply, 1, &needed) != PV_OK)
        return PV_NO_ROOM;   /* cannot happen after the space check; redoing the I/O is harmless */
    d->requests++;
    if (write)
        d->bytes_written += transfer;
    else
        d->bytes_read += transfer;
    d->unpublished_bytes += transfer;
    return d->unpublished_bytes >= PUBLISH_BYTES ? PV_HANDLED_PUBLISH : PV_HANDLED;
}

