/* guest_pages.h -- page lists to iovecs, for host C fast paths.
 *
 * The C counterpart of vmbus.guest_memory.GuestMemory.iovec, with the same
 * rules: the byte offset lies inside the first page, the list holds every
 * page the range touches, each PFN lies inside guest RAM, and consecutive
 * PFNs merge into one iovec.  The PFNs must already be a private copy (the
 * guest can rewrite shared memory at any time).  C-only: not a cffi cdef;
 * include it after ring.h, whose PV_PAGE_SIZE is the one page size.
 */
#include <stdint.h>
#include <sys/uio.h>

#define PV_GUEST_PAGE_SHIFT 12
#define PV_GUEST_PAGE_SIZE ((uint32_t)PV_PAGE_SIZE)
_Static_assert(PV_PAGE_SIZE == 1 << PV_GUEST_PAGE_SHIFT, "the page shift names PV_PAGE_SIZE");

/* Fill `iov` (room for `max_iov`) for `byte_count` bytes starting
 * `byte_offset` into the first of `pfns`.  Returns the number of iovecs, or
 * -1 when a rule is broken (nothing is then to be touched). */
static inline int pv_guest_iovec(uint8_t *ram, uint64_t ram_pages, const uint64_t *pfns, uint32_t npfns,
                                 uint32_t byte_offset, uint32_t byte_count, struct iovec *iov, int max_iov)
{
    uint64_t pages, i;
    uint32_t left = byte_count, offset = byte_offset;
    int n = 0;

    if (byte_count == 0 || byte_offset >= PV_GUEST_PAGE_SIZE)
        return -1;
    pages = ((uint64_t)byte_offset + byte_count + PV_GUEST_PAGE_SIZE - 1) >> PV_GUEST_PAGE_SHIFT;
    if (pages > npfns)
        return -1;
    for (i = 0; i < pages;) {
        uint64_t start = pfns[i], run = 1;
        uint32_t len;
        if (start >= ram_pages)
            return -1;
        while (i + run < pages && pfns[i + run] == start + run && start + run < ram_pages)
            run++;
        if (n == max_iov)
            return -1;
        len = (uint32_t)((run << PV_GUEST_PAGE_SHIFT) - offset);
        if (len > left)
            len = left;
        iov[n].iov_base = ram + (start << PV_GUEST_PAGE_SHIFT) + offset;
        iov[n].iov_len = len;
        n++;
        left -= len;
        offset = 0;
        i += run;
    }
    return n;
}
