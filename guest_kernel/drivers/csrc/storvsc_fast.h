/* storvsc_fast.h -- the guest disk driver's per-request C (cffi cdef too).
 *
 * Build one READ/WRITE 16 request into the outgoing ring, decode one
 * completion from the incoming ring: the queue layer (ring/csrc/queue.c:
 * pv_stage, pv_reap) runs them over a batch, and vmbus/queue.py owns when
 * to publish, mask, poll and re-check.  Transaction ids, waiting and every
 * request that is not a plain read or write stay in Python.
 */

/* Field order is the order Python builds them in: cffi fills an array of
 * these from a list of (lba, pfn, blocks, write, fua, trans_id) tuples. */
typedef struct {
    uint64_t lba;
    uint64_t pfn;          /* first page of the buffer; the rest follow it */
    uint32_t blocks;
    uint8_t  write;
    uint8_t  fua;
    uint64_t trans_id;
} storvsc_io;

typedef struct {
    uint64_t trans_id;
    uint32_t transferred;  /* the SRB's data_transfer_length */
    uint16_t type;         /* packet type as received */
    uint16_t payload_len;  /* bytes of `payload` that came (at most 64) */
    uint8_t  ok;           /* COMPLETE_IO, status 0, SRB SUCCESS, SCSI GOOD */
    uint8_t  payload[64];  /* the vstor packet, for anything but `ok` */
} storvsc_completion;

/* Stage ios[0..n) (pv_stage with storvsc_build_one): PV_OK when all went
 * in, else the ring's reason for the next one (PV_FULL with *needed,
 * PV_CORRUPT), or PV_BAD_ARGUMENT for a transfer of 0 or above
 * SV_MAX_TRANSFER bytes. */
int storvsc_stage(pv_ring *out, uint32_t block_size, const storvsc_io *ios, uint32_t n,
                  uint32_t *staged, uint32_t *needed);

/* Take up to `max` completions (pv_reap with storvsc_decode_one); *n says
 * how many.  PV_OK, PV_EMPTY (none) or PV_CORRUPT.  The caller commits. */
int storvsc_reap(pv_ring *in, storvsc_completion *done, uint32_t max, uint32_t *n);
