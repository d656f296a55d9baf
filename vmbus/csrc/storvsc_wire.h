/* storvsc_wire.h -- the storvsc/storvsp packet layout for the C fast paths.
 *
 * The same bytes as vmbus/protocols/storvsc.py (struct vstor_packet and the
 * Win8 struct vmscsi_request of torvalds/linux drivers/scsi/storvsc_drv.c);
 * tests pin every offset here against the Python structs.  Like ring.h this
 * is both a C header and a cffi cdef: plain declarations only.  Every field
 * falls on its natural alignment, so no packing pragma is needed.
 */

#define SV_PACKET_SIZE 64
/* The largest transfer a request may carry, and the pages its one GPA range
 * may name (a transfer that starts inside a page touches one page more).
 * Both C paths accept exactly this much; the host never advertises more
 * (vmbus/protocols/storvsc.py MAX_TRANSFER, pinned to these by a test). */
#define SV_MAX_TRANSFER 8388608
#define SV_MAX_PAGES 2049
#define SV_SRB_SIZE 52
#define SV_CDB_SIZE 20              /* cdb[] doubles as sense[] on completion */
#define SV_OP_COMPLETE_IO 1
#define SV_OP_EXECUTE_SRB 3
#define SV_REQUEST_COMPLETION_FLAG 1
#define SV_SRB_STATUS_SUCCESS 1
#define SV_DATA_IN 1
#define SV_SRB_FLAGS_DATA_IN 64
#define SV_SRB_FLAGS_DATA_OUT 128
#define SV_SENSE_SIZE 20
#define SV_READ_10 40
#define SV_WRITE_10 42
#define SV_SYNCHRONIZE_CACHE_10 53
#define SV_READ_16 136
#define SV_WRITE_16 138
#define SV_SYNCHRONIZE_CACHE_16 145
#define SV_CDB_FUA 8                /* byte 1 of READ/WRITE 10/16 */

struct sv_srb {                     /* vmscsi_request, 52 bytes */
    uint16_t length;
    uint8_t  srb_status;
    uint8_t  scsi_status;
    uint8_t  port;
    uint8_t  path;
    uint8_t  target;
    uint8_t  lun;
    uint8_t  cdb_length;
    uint8_t  sense_info_length;
    uint8_t  data_in;
    uint8_t  reserved;
    uint32_t data_transfer_length;
    uint8_t  cdb[20];
    uint16_t reserve;
    uint8_t  queue_tag;
    uint8_t  queue_action;
    uint32_t srb_flags;
    uint32_t time_out_value;
    uint32_t queue_sort_key;
};

struct sv_packet {                  /* vstor_packet, 64 bytes */
    uint32_t operation;
    uint32_t flags;
    uint32_t status;
    struct sv_srb srb;
};

/* The type-specific header of a GPA-direct packet (type 9) with exactly
 * one range: struct vmdata_gpa_direct + struct vmbus_channel_packet_multipage_buffer
 * without the descriptor.  The PFNs follow it. */
struct sv_gpa_head {
    uint32_t reserved;
    uint32_t range_count;
    uint32_t byte_count;
    uint32_t byte_offset;
};
