"""The synthetic NIC, host half (netvsp) and its backends."""
