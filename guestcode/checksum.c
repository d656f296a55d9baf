/* The compute workload: FNV-1a over 64-bit little-endian words.  Pure C,
 * no library: the same source is built into the x86-64 guest, a native
 * shared object and an aarch64 routine.  Each step depends on the last
 * (multiply latency), so no compiler turns it into something else. */
#include "checksum.h"

unsigned long pv_checksum(const unsigned long *words, unsigned long count)
{
    unsigned long h = 0xcbf29ce484222325UL;
    for (unsigned long i = 0; i < count; i++) {
        h ^= words[i];
        h *= 0x100000001b3UL;
    }
    return h;
}
