"""Guest drivers (VSCs) bundled with the kernel."""
