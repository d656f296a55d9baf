"""The paravirtual SCSI disk's host half (a storvsp): backend, SCSI, device."""
