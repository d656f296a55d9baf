/* storvsc_fast.c -- build one read/write request, decode one completion.
 *
 * A request is what the Python driver builds with storvsc.scsi_request and
 * read_write_cdb (tests compare the bytes): a vstor_packet EXECUTE_SRB whose
 * SRB carries a READ 16 or WRITE 16 CDB, sent as a GPA-direct packet naming
 * `blocks * block_size` bytes from offset 0 of page `pfn` onwards.
 * Completions come from an untrusted host: only the private copy taken
 * here is parsed, and a short payload reads as zeros.  The batch loops are
 * the queue layer's (pv_stage, pv_reap in ring/csrc/queue.c).
 */
#include <stdint.h>
#include <stddef.h>
#include <string.h>

#include "ring.h"
#include "queue.h"
#include "storvsc_wire.h"
#include "storvsc_fast.h"

#define SRB_TIMEOUT 60

static void put_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static void build_request(struct sv_packet *vp, const storvsc_io *io, uint32_t transfer)
{
    struct sv_srb *srb = &vp->srb;
    memset(vp, 0, sizeof *vp);
    vp->operation = SV_OP_EXECUTE_SRB;
    vp->flags = SV_REQUEST_COMPLETION_FLAG;
    srb->length = SV_SRB_SIZE;
    srb->cdb_length = 16;
    srb->sense_info_length = SV_SENSE_SIZE;
    srb->data_in = io->write ? 0 : SV_DATA_IN;
    srb->data_transfer_length = transfer;
    srb->srb_flags = io->write ? SV_SRB_FLAGS_DATA_OUT : SV_SRB_FLAGS_DATA_IN;
    srb->time_out_value = SRB_TIMEOUT;
    srb->cdb[0] = io->write ? SV_WRITE_16 : SV_READ_16;
    srb->cdb[1] = io->fua ? SV_CDB_FUA : 0;
    put_be32(srb->cdb + 2, (uint32_t)(io->lba >> 32));
    put_be32(srb->cdb + 6, (uint32_t)io->lba);
    put_be32(srb->cdb + 10, io->blocks);
}

/* pv_builder: one request; ctx points at the block size. */
static int build_one(void *ctx, const void *item, pv_ring *out, uint32_t *needed)
{
    const storvsc_io *io = item;
    uint64_t transfer = (uint64_t)io->blocks * *(const uint32_t *)ctx;
    uint32_t pages = (uint32_t)((transfer + PV_PAGE_SIZE - 1) / PV_PAGE_SIZE), p;
    struct {
        struct sv_gpa_head head;
        uint64_t pfns[SV_MAX_PAGES];
    } gpa;
    struct sv_packet vp;
    pv_iov payload = {(const uint8_t *)&vp, sizeof vp};

    if (transfer == 0 || transfer > SV_MAX_TRANSFER)
        return PV_BAD_ARGUMENT;
    build_request(&vp, io, (uint32_t)transfer);
    gpa.head.reserved = 0;
    gpa.head.range_count = 1;
    gpa.head.byte_count = (uint32_t)transfer;
    gpa.head.byte_offset = 0;
    for (p = 0; p < pages; p++)
        gpa.pfns[p] = io->pfn + p;
    return pv_ring_write(out, PV_PKT_DATA_USING_GPA_DIRECT, PV_FLAG_COMPLETION_REQUESTED, io->trans_id,
                         (const uint8_t *)&gpa, (uint32_t)(sizeof gpa.head + 8u * pages), &payload, 1, needed);
}

int storvsc_stage(pv_ring *out, uint32_t block_size, const storvsc_io *ios, uint32_t n,
                  uint32_t *staged, uint32_t *needed)
{
    return pv_stage(out, build_one, &block_size, ios, sizeof *ios, n, staged, needed);
}

/* pv_decoder: one completion, parsed from a private copy. */
static int decode_one(void *ctx, pv_ring *in, const pv_packet *pkt, void *slot)
{
    storvsc_completion *c = slot;
    struct sv_packet vp;
    uint32_t len = pkt->packet_len - pkt->header_len;

    (void)ctx;
    if (len > sizeof c->payload)
        len = sizeof c->payload;
    memset(c->payload, 0, sizeof c->payload);
    pv_ring_copy_out(in, pkt->ring_offset + pkt->header_len, len, c->payload);
    memcpy(&vp, c->payload, sizeof vp);
    c->trans_id = pkt->trans_id;
    c->type = pkt->type;
    c->payload_len = (uint16_t)len;
    c->transferred = vp.srb.data_transfer_length;
    c->ok = pkt->type == PV_PKT_COMP && len >= SV_PACKET_SIZE && vp.operation == SV_OP_COMPLETE_IO &&
            vp.status == 0 && (vp.srb.srb_status & 0x3f) == SV_SRB_STATUS_SUCCESS && vp.srb.scsi_status == 0;
    return 0;
}

int storvsc_reap(pv_ring *in, storvsc_completion *done, uint32_t max, uint32_t *n)
{
    return pv_reap(in, decode_one, NULL, done, sizeof *done, max, n);
}
