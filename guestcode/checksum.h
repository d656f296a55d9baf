#ifndef GUESTCODE_CHECKSUM_H
#define GUESTCODE_CHECKSUM_H
unsigned long pv_checksum(const unsigned long *words, unsigned long count);
#endif
