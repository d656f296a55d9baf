/* A driver for the DMA disk controller as an unmodified OS would carry it:
 * freestanding x86-64, no library, nothing of the hypervisor.  It programs
 * the controller's eight 8-byte MMIO registers at DMA_GPA (command, LBA,
 * count, buffer address, doorbell, status, interrupt acknowledge,
 * capacity), one request at a time, and learns of completion either from
 * the controller's interrupt (vector IRQ_VECTOR) or by polling the status
 * register, as the job block says.  The same binary also runs the compute
 * workload (pv_checksum over guest memory).
 *
 * Like a small OS: _start (at CODE_GPA, 64-bit mode, ring 0, paging on with
 * user-accessible pages) installs its GDT, TSS and IDT, then drops to
 * ring 3 where the job runs; the interrupt handler runs in ring 0 on the
 * TSS's stack.  The end is a write to POWER_OFF. */
#include "checksum.h"
#include "layout.h"

enum { CMD = 0x00, LBA = 0x08, COUNT = 0x10, ADDR = 0x18, DOORBELL = 0x20,
       STATUS = 0x28, INT_ACK = 0x30, CAPACITY = 0x38 };
enum { DONE = 1, ERROR = 2 };
enum { KERNEL_CS = 0x08, KERNEL_DS = 0x10, USER_CS = 0x18 | 3, USER_DS = 0x20 | 3, TSS_SEL = 0x28 };

/* The job block is shared with the host: every access a real one. */
#define JOB ((volatile struct job *)JOB_GPA)

/* Device registers: volatile 8-byte loads and stores, each one access. */
static inline void reg_write(unsigned long off, unsigned long v)
{
    *(volatile unsigned long *)(DMA_GPA + off) = v;
}

static inline unsigned long reg_read(unsigned long off)
{
    return *(volatile unsigned long *)(DMA_GPA + off);
}

/* Written by the interrupt handler, read by the waiting loop (volatile:
 * one CPU, so compiler ordering is all there is to keep). */
static volatile unsigned long irq_status;
static volatile unsigned long irq_seen;

struct interrupt_frame;

__attribute__((interrupt)) static void dma_isr(struct interrupt_frame *frame)
{
    (void)frame;
    irq_status = reg_read(STATUS);
    reg_write(INT_ACK, 1);
    irq_seen = 1;
    JOB->interrupts++;
}

struct __attribute__((packed)) table_pointer {
    unsigned short limit;
    unsigned long base;
};

struct __attribute__((packed)) tss {
    unsigned int reserved0;
    unsigned long rsp[3];
    unsigned long reserved1;
    unsigned long ist[7];
    unsigned long reserved2;
    unsigned short reserved3;
    unsigned short iomap_base;
};

static void install_tables(void)
{
    volatile unsigned long *gdt = (unsigned long *)GDT_GPA;
    volatile struct tss *tss = (struct tss *)TSS_GPA;
    volatile unsigned long *idt = (unsigned long *)IDT_GPA;
    unsigned long t = TSS_GPA, isr = (unsigned long)dma_isr;

    tss->rsp[0] = KSTACK_TOP;
    tss->iomap_base = sizeof(struct tss); /* no I/O bitmap: ring 3 has no ports */
    gdt[0] = 0;
    gdt[1] = 0x00af9a000000ffffUL; /* kernel code, 64-bit */
    gdt[2] = 0x00cf92000000ffffUL; /* kernel data */
    gdt[3] = 0x00affa000000ffffUL; /* user code, 64-bit */
    gdt[4] = 0x00cff2000000ffffUL; /* user data */
    gdt[5] = (sizeof(struct tss) - 1) | (t & 0xffffff) << 16 | 0x89UL << 40 | (t >> 24 & 0xff) << 56; /* 64-bit TSS */
    gdt[6] = t >> 32;
    struct table_pointer gp = { 7 * 8 - 1, GDT_GPA };
    __asm__ volatile("lgdt %0" : : "m"(gp) : "memory");
    __asm__ volatile("ltr %w0" : : "r"(TSS_SEL) : "memory");
    /* one interrupt gate: present, ring 0, 64-bit interrupt gate (0x8e) */
    idt[2 * IRQ_VECTOR] = (isr & 0xffff) | (unsigned long)KERNEL_CS << 16 | 0x8eUL << 40 | (isr >> 16 & 0xffff) << 48;
    idt[2 * IRQ_VECTOR + 1] = isr >> 32;
    struct table_pointer ip = { (IRQ_VECTOR + 1) * 16 - 1, IDT_GPA };
    __asm__ volatile("lidt %0" : : "m"(ip) : "memory");
}

/* One request: registers, doorbell, wait, status (and acknowledge). */
static unsigned long dma_request(unsigned long cmd, unsigned long lba, unsigned long count, unsigned long gpa)
{
    unsigned long status;
    reg_write(CMD, cmd);
    reg_write(LBA, lba);
    reg_write(COUNT, count);
    reg_write(ADDR, gpa);
    if (JOB->use_irq) {
        irq_seen = 0;
        reg_write(DOORBELL, 1);
        while (!irq_seen) /* interrupts are on in ring 3; the handler acknowledges */
            __asm__ volatile("pause" ::: "memory");
        status = irq_status;
    } else {
        reg_write(DOORBELL, 1);
        while (!((status = reg_read(STATUS)) & DONE))
            __asm__ volatile("pause" ::: "memory");
        reg_write(INT_ACK, 1);
    }
    return status;
}

static void run_job(void)
{
    volatile struct job *job = JOB;
    if (job->op == OP_CHECKSUM) {
        job->checksum = pv_checksum((const unsigned long *)job->buffer, job->length / 8);
        return;
    }
    job->capacity = reg_read(CAPACITY);
    const unsigned long *lbas = (const unsigned long *)job->lba_list;
    unsigned long cmd = job->op == OP_WRITE ? 2 : 1;
    for (unsigned long i = 0; !job->stop && (!job->max_requests || i < job->max_requests); i++) {
        unsigned long slot = job->nlbas ? i % job->nlbas : 0;
        unsigned long status = dma_request(cmd, lbas[slot], job->blocks, job->buffer + slot * job->stride);
        job->last_status = status;
        if (status & ERROR)
            job->errors++;
        job->requests++;
    }
}

__attribute__((noreturn, used)) static void user_main(void)
{
    run_job();
    JOB->finished = 1;
    for (;;)
        *(volatile unsigned long *)POWER_OFF = 1;
}

__attribute__((noreturn, used)) static void kernel_main(void)
{
    install_tables();
    /* to ring 3: SS, RSP, RFLAGS, CS, RIP; interrupts on only when the job
     * waits for them (a polling driver keeps the line masked) */
    unsigned long rflags = JOB->use_irq ? 0x202 : 0x002;
    __asm__ volatile(
        "pushq %0\n pushq %1\n pushq %2\n pushq %3\n pushq %4\n iretq"
        : : "i"(USER_DS), "i"(STACK_TOP), "r"(rflags), "i"(USER_CS), "r"(user_main) : "memory");
    __builtin_unreachable();
}

__attribute__((section(".text.entry"), naked, noreturn)) void _start(void)
{
    __asm__ volatile("mov $" "0x7000" ", %rsp\n"
                     "call kernel_main\n");
}
