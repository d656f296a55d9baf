/* storvsp_fast.h -- the storvsp's regular request as a pv_serve handler
 * (cffi cdef too).
 *
 * storvsp_handle() parses and serves one request: a regular READ/WRITE
 * (10/16, carried GPA-direct) moves its data with preadv/pwritev straight
 * between the image and guest RAM and stages its completion.  Everything
 * else is PV_NOT_MINE (left unread for the Python path, which owns every
 * error status and every control operation).  The queue layer's pv_serve
 * (ring/csrc/queue.c) does the draining, publishing, signalling, polling
 * and sleeping around it; host_drivers/storage/fastpath.py runs it.
 */

/* Free bytes the answer ring must have before a completion is written
 * (pv_server.room_needed): one completion (descriptor 16, vstor packet
 * 64, trailer 8) plus the 8 bytes that keep a ring from ever being full.
 * storvsp_fast.c checks it against the layout at compile time. */
#define STORVSP_ROOM_NEEDED 96

/* One disk served by one channel's handler (its `ctx`). */
typedef struct {
    uint8_t  *ram;             /* the whole guest RAM mapping */
    uint64_t  ram_pages;
    int       disk_fd;
    uint32_t  block_size;
    uint64_t  blocks;
    uint32_t  max_transfer;
    int       read_only;

    /* the handler's own (private to the host) */
    uint64_t  unpublished_bytes; /* moved since the answers were last published */
    uint64_t  requests;
    uint64_t  bytes_read;
    uint64_t  bytes_written;
} storvsp_disk;

int storvsp_handle(void *ctx, pv_ring *in, const pv_packet *pkt, pv_ring *out);
