/* ring.h -- the VMBus ring layout and the C core's API.
 *
 * This one file is both the C header of ring.c and the cffi cdef: cffi
 * parses it as it stands, so it holds only plain declarations (no
 * #include, no include guard, no function-like macros).  The includer
 * brings <stdint.h> and <stddef.h> first.
 *
 * Layout facts (byte offsets, sizes, packet format) follow
 * torvalds/linux include/linux/hyperv.h (struct hv_ring_buffer,
 * struct vmpacket_descriptor) and microsoft/openvmm
 * vm/devices/vmbus/vmbus_ring/src/lib.rs.
 */

/* ---- layout ------------------------------------------------------- */

#define PV_PAGE_SIZE 4096
#define PV_CONTROL_SIZE 4096          /* the control page in front of the data */
#define PV_DESC_SIZE 16               /* struct vmpacket_descriptor */
#define PV_TRAILER_SIZE 8             /* u64, start offset << 32 */
#define PV_MAX_LEN8 65535             /* len8 is a u16 */
#define PV_FEAT_PENDING_SEND_SZ 1     /* feature_bits bit 0 */
#define PV_FLAG_COMPLETION_REQUESTED 1

/* packet types (enum vmbus_packet_type) the ring accepts */
#define PV_PKT_DATA_INBAND 6
#define PV_PKT_DATA_USING_XFER_PAGES 7
#define PV_PKT_DATA_USING_GPA_DIRECT 9
#define PV_PKT_COMP 11

/* The control page exactly as it lies in shared memory. */
struct pv_ring_control {
    uint32_t write_index;      /*  0: written by the producer only */
    uint32_t read_index;       /*  4: written by the consumer only */
    uint32_t interrupt_mask;   /*  8: consumer: 1 = "don't signal me" */
    uint32_t pending_send_sz;  /* 12: producer: free bytes it waits for */
    uint32_t reserved1[12];    /* 16 */
    uint32_t feature_bits;     /* 64: bit 0 = pending_send_sz supported */
    uint8_t  reserved2[4028];  /* 68 .. 4096 */
};

/* struct vmpacket_descriptor */
struct pv_packet_descriptor {
    uint16_t type;
    uint16_t offset8;   /* payload offset from the descriptor, 8-byte units */
    uint16_t len8;      /* packet length without trailer, 8-byte units */
    uint16_t flags;
    uint64_t trans_id;
};

/* ---- results ------------------------------------------------------- */

#define PV_OK 0
#define PV_EMPTY 1           /* nothing to read */
#define PV_FULL 2            /* not enough room now; see *needed */
#define PV_TOO_LARGE 3       /* can never fit in this ring */
#define PV_CORRUPT 4         /* the peer wrote something invalid */
#define PV_BAD_ARGUMENT 5    /* our own caller's mistake */
#define PV_NO_SPACE 6        /* caller's output buffer too small */

/* Why a ring was declared corrupt (pv_ring.corrupt_reason). */
#define PV_CORRUPT_NONE 0
#define PV_CORRUPT_INDEX 1         /* peer index out of range or unaligned */
#define PV_CORRUPT_SHORT 2         /* fewer bytes than a descriptor + trailer */
#define PV_CORRUPT_OFFSET8 3       /* offset8 < 2 or offset8 > len8 */
#define PV_CORRUPT_LENGTH 4        /* len8 exceeds the bytes available */
#define PV_CORRUPT_TYPE 5          /* unknown packet type */
#define PV_CORRUPT_FLAGS 6         /* flag bits other than completion-requested */

/* One side's view of one ring.  Everything here is private memory of the
 * process that owns the handle; only `ctl` and `data` point into shared
 * memory.  The published indices we own are kept here, never re-read from
 * shared memory, so a peer that scribbles on them cannot steer us. */
typedef struct {
    struct pv_ring_control *ctl;
    uint8_t  *data;
    uint32_t size;              /* data area bytes, multiple of 4096 */

    /* producer side */
    uint32_t write_published;   /* last write_index we stored */
    uint32_t write_staged;      /* where the next staged packet goes */
    uint32_t pending_armed;     /* we set pending_send_sz, clear on success */

    /* consumer side */
    uint32_t read_published;    /* last read_index we stored */
    uint32_t read_staged;       /* next packet to hand out */

    uint32_t corrupt_reason;    /* PV_CORRUPT_* of the last PV_CORRUPT */
    uint32_t corrupt_value;     /* the offending value, for the message */

    /* counters (private, never shared) */
    uint64_t packets;           /* staged by write, or handed out by read */
    uint64_t bytes;             /* packet bytes incl. trailer */
    uint64_t commits;           /* commits that moved the index */
    uint64_t signals;           /* commits that said "signal the peer" */
    uint64_t full_events;       /* writes refused with PV_FULL */
} pv_ring;

/* A packet as handed to the consumer: a validated private copy of the
 * descriptor plus where its bytes are. */
typedef struct {
    uint16_t type;
    uint16_t flags;
    uint32_t header_len;  /* offset8 * 8, descriptor included */
    uint32_t packet_len;  /* len8 * 8, trailer excluded */
    uint64_t trans_id;
    uint32_t ring_offset; /* start of the descriptor in the data area */
    uint32_t out_offset;  /* read_many: where its bytes went in `out` */
} pv_packet;

/* A gather element for writes. */
typedef struct {
    const uint8_t *base;
    size_t len;
} pv_iov;

/* ---- attach ---------------------------------------------------------- */

/* Lay a handle over `len` bytes at `base` (8-aligned; len = 4096 + data,
 * data a non-zero multiple of 4096).  `format` zeroes the control page
 * and sets feature bit 0 (the side that creates the ring does that); a
 * later attach picks up the current indices, validated. */
int pv_ring_attach(pv_ring *r, uint8_t *base, size_t len, int format);

/* ---- producer -------------------------------------------------------- */

/* Stage one packet: descriptor, `header` (type-specific header after the
 * descriptor, header_len a multiple of 8, may be 0), the gather list
 * padded to 8, trailer.  Nothing is visible to the reader until
 * pv_ring_commit_write.  On PV_FULL *needed says how many free bytes the
 * ring must have (staged-but-unpublished bytes included). */
int pv_ring_write(pv_ring *r, uint16_t type, uint16_t flags, uint64_t trans_id,
                  const uint8_t *header, uint32_t header_len,
                  const pv_iov *iov, uint32_t niov, uint32_t *needed);

/* pv_ring_write for the common case: one contiguous payload, no
 * type-specific header (`buf` is char so Python bytes pass without a copy). */
int pv_ring_write1(pv_ring *r, uint16_t type, uint16_t flags, uint64_t trans_id,
                   const char *buf, size_t len, uint32_t *needed);

/* Stage one packet as pv_ring_write1 and publish at once: the
 * "send one now" path in a single call.  Returns 1/0 (signal the reader or
 * not, as pv_ring_commit_write) or a negative PV_* error. */
int pv_ring_send1(pv_ring *r, uint16_t type, uint16_t flags, uint64_t trans_id,
                  const char *buf, size_t len, uint32_t *needed);

/* Stage up to n in-band packets whose payloads lie back to back in
 * `payloads` with lengths `lens`; trans_id of packet i is trans_id0 + i.
 * *written tells how many were staged; the result is PV_OK when all were,
 * else the reason the next one was refused. */
int pv_ring_write_many(pv_ring *r, uint16_t type, uint16_t flags, uint64_t trans_id0,
                       const uint8_t *payloads, const uint32_t *lens, uint32_t n,
                       uint32_t *written, uint32_t *needed);

/* Publish everything staged with one index store.  Returns 1 when the
 * reader must be signalled (its interrupt_mask is 0 and the ring was empty
 * before this batch), 0 when not, or -PV_CORRUPT. */
int pv_ring_commit_write(pv_ring *r);

/* Drop everything staged since the last commit. */
void pv_ring_revert_write(pv_ring *r);

/* Ask the reader to signal once `needed` free bytes exist.  Returns 1 if
 * that much is already free after arming (the caller retries rather than
 * waits), 0 if the caller should wait, or -PV_TOO_LARGE / -PV_CORRUPT. */
int pv_ring_arm_pending_send(pv_ring *r, uint32_t needed);
void pv_ring_clear_pending_send(pv_ring *r);

/* Free bytes a producer could use now (published peer read index),
 * minus staged bytes; -PV_CORRUPT if the peer's index is bad. */
int64_t pv_ring_write_space(pv_ring *r);

/* ---- consumer -------------------------------------------------------- */

/* Validate and hand out the next packet without copying it.  PV_OK,
 * PV_EMPTY or PV_CORRUPT (the ring stays corrupt: every later call fails
 * the same way until the channel is torn down). */
int pv_ring_next(pv_ring *r, pv_packet *pkt);

/* pv_ring_next in two steps, for a consumer that decides after looking:
 * peek validates the packet at the head (PV_OK / PV_EMPTY / PV_CORRUPT)
 * without taking it; take (with that same packet) moves past it. */
int pv_ring_peek(pv_ring *r, pv_packet *pkt);
void pv_ring_take(pv_ring *r, const pv_packet *pkt);

/* Spin up to `spins` times for data, then take the next packet as
 * pv_ring_next does: PV_OK, PV_EMPTY (nothing came) or PV_CORRUPT. */
int pv_ring_poll_next(pv_ring *r, uint32_t spins, pv_packet *pkt);

/* Copy bytes [off, off+len) of the data area, wrapping, into `out`. */
void pv_ring_copy_out(const pv_ring *r, uint32_t off, uint32_t len, uint8_t *out);

/* Take up to `max` packets, copying each into `out` (cap bytes): the whole
 * packet (descriptor, header, payload) or, with payload_only, only the
 * bytes after offset8, back to back.  *n says how many were taken;
 * PV_OK / PV_EMPTY (none at all) / PV_CORRUPT.  Stops early, with PV_OK,
 * when `out` cannot hold the next packet. */
int pv_ring_read_many(pv_ring *r, uint8_t *out, size_t cap, int payload_only,
                      pv_packet *pkts, uint32_t max, uint32_t *n, size_t *used);

/* Publish the staged read index.  Returns 1 when a blocked writer must be
 * signalled (the pending_send_sz transition), 0 when not, -PV_CORRUPT. */
int pv_ring_commit_read(pv_ring *r);

/* Bytes published by the writer and not yet handed out, or -PV_CORRUPT. */
int64_t pv_ring_read_available(pv_ring *r);

/* interrupt_mask = 1 (the consumer is draining or polling). */
void pv_ring_mask(pv_ring *r);

/* interrupt_mask = 0, then re-check: returns the bytes that arrived while
 * masked (> 0 means "keep draining, no signal is coming"), or -PV_CORRUPT. */
int64_t pv_ring_unmask(pv_ring *r);

/* Spin up to `spins` times waiting for data; returns bytes available, 0,
 * or -PV_CORRUPT.  Releases the GIL (cffi does) so it costs no Python. */
int64_t pv_ring_poll(pv_ring *r, uint32_t spins);

/* Spin over `n` rings (one is fine) for up to `usec` microseconds: the
 * index of the first with data (or a corrupt index, which its next read
 * reports), or -1 if none had any in time. */
int pv_ring_poll_many(pv_ring *const *rings, uint32_t n, uint32_t usec);
