/* shmops.c -- see shmops.h.  seq_cst everywhere: each use is a Dekker-style
 * handshake (the writer stores its word then loads the peer's; so does the
 * peer), which needs store->load ordering on both sides. */
#include <stdatomic.h>
#include <stdint.h>

#include "shmops.h"

uint32_t pv_load32(const uint8_t *p)
{
    return atomic_load((_Atomic uint32_t *)p);
}

void pv_store32(uint8_t *p, uint32_t v)
{
    atomic_store((_Atomic uint32_t *)p, v);
}

uint64_t pv_xchg64(uint8_t *p, uint64_t v)
{
    return atomic_exchange((_Atomic uint64_t *)p, v);
}

uint64_t pv_or64(uint8_t *p, uint64_t v)
{
    return atomic_fetch_or((_Atomic uint64_t *)p, v);
}

uint8_t pv_or8(uint8_t *p, uint8_t v)
{
    return atomic_fetch_or((_Atomic uint8_t *)p, v);
}

void pv_fence(void)
{
    atomic_thread_fence(memory_order_seq_cst);
}
