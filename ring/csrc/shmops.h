/* shmops.h -- single-word atomics on memory shared with another process.
 *
 * For the SynIC message slot and event-flag pages, where both sides touch
 * the same words and Python alone could not order the accesses.  Like
 * ring.h this file is also the cffi cdef.  Every function checks nothing:
 * callers pass pointers they have bounds-checked (vmbus.guest_memory).
 * All operations are sequentially consistent: these are handshakes
 * (store my flag, then load yours) where anything weaker loses wake-ups.
 */
uint32_t pv_load32(const uint8_t *p);
void pv_store32(uint8_t *p, uint32_t v);
uint64_t pv_xchg64(uint8_t *p, uint64_t v);
uint64_t pv_or64(uint8_t *p, uint64_t v);
uint8_t pv_or8(uint8_t *p, uint8_t v);
void pv_fence(void);
