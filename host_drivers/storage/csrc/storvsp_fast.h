/* storvsp_fast.h -- the storvsp's per-request path in C (cffi cdef too).
 *
 * storvsp_serve() owns one channel's two rings while it runs: it drains
 * requests, serves the regular ones (READ/WRITE 10/16 carried GPA-direct)
 * with preadv/pwritev straight between the image and guest RAM, writes
 * their completions, publishes both rings, and sleeps on the channel's
 * eventfd when there is nothing to do.  It returns to its caller only for
 * what C does not decide:
 *
 *   SVQ_SIGNAL   the rings say the guest must be interrupted;
 *   SVQ_PUNT     the request at the head of the ring is anything else
 *                (control, INQUIRY, UNMAP, flush, an error to report, a
 *                malformed request): it is left unread for the Python path,
 *                which owns every error status;
 *   SVQ_CORRUPT  a ring is corrupt (the ring handle says why);
 *   SVQ_STOPPED  the owner asked it to stop (`stop` plus `stop_fd`).
 */

#define SVQ_SIGNAL 1
#define SVQ_PUNT 2
#define SVQ_CORRUPT 4
#define SVQ_STOPPED 8

typedef struct {
    pv_ring  *inbound;         /* guest -> host: requests */
    pv_ring  *outbound;        /* host -> guest: completions */
    uint8_t  *ram;             /* the whole guest RAM mapping */
    uint64_t  ram_pages;
    int       disk_fd;
    uint32_t  block_size;
    uint64_t  blocks;
    uint32_t  max_transfer;
    int       read_only;
    int       kick_fd;         /* the guest's HvSignalEvent lands here */
    int       stop_fd;         /* eventfd: wakes a sleeping serve to stop */
    int       stop;            /* set by the owner, read atomically */
    uint32_t  spin_us;         /* poll this long for more work before sleeping */

    /* counters, private to the host */
    uint64_t  requests;
    uint64_t  bytes_read;
    uint64_t  bytes_written;
    uint64_t  punted;
    uint64_t  wakeups;
    uint64_t  polls_hit;
    uint64_t  ring_full_waits;
} storvsp_queue;

int storvsp_serve(storvsp_queue *q);
