/* The guest machine's fixed physical layout and the job block the host
 * fills before starting the vCPU (mirrored by pvbus/bench/guestbin.py).
 * Everything is 64-bit little-endian. */
#ifndef GUESTCODE_LAYOUT_H
#define GUESTCODE_LAYOUT_H

#define GDT_GPA      0x0800UL  /* the guest's own GDT, loaded by the guest */
#define TSS_GPA      0x0100UL  /* its task state segment (the ring-0 stack for interrupts) */
#define IDT_GPA      0x0400UL  /* its IDT, vectors 0..IRQ_VECTOR */
#define DMA_GPA      0x1000UL  /* the DMA controller's registers: an MMIO hole, not RAM */
#define JOB_GPA      0x5000UL  /* struct job */
#define KSTACK_TOP   0x7000UL  /* ring 0: boot and the interrupt handler */
#define STACK_TOP    0x8000UL  /* ring 3: the driver's loop */
#define CODE_GPA     0x10000UL /* where the binary is loaded and linked */

#define IRQ_VECTOR   0x20      /* the controller's completion interrupt */
#define POWER_OFF    0x1800UL  /* MMIO in the hole, outside the controller: a write powers the machine off */

enum job_op { OP_READ = 1, OP_WRITE = 2, OP_CHECKSUM = 3 };

struct job {
    /* set by the host */
    unsigned long op;          /* enum job_op */
    unsigned long blocks;      /* 512-byte blocks per request */
    unsigned long buffer;      /* GPA of the data buffer */
    unsigned long nlbas;       /* entries in the LBA list */
    unsigned long lba_list;    /* GPA of nlbas 64-bit LBAs, used in turn */
    unsigned long stride;      /* bytes the buffer advances per list entry (0: one buffer) */
    unsigned long use_irq;     /* 1: sleep until the completion interrupt; 0: poll status */
    unsigned long max_requests;/* 0: until stop */
    unsigned long length;      /* OP_CHECKSUM: bytes to sum (a multiple of 8) */
    volatile unsigned long stop; /* the host sets it to end the loop */
    unsigned long reserved[6];
    /* set by the guest */
    unsigned long requests;
    unsigned long errors;
    unsigned long last_status;
    unsigned long checksum;
    unsigned long interrupts;
    unsigned long capacity;
    unsigned long finished;
};

#endif
