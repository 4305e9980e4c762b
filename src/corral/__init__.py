"""corral: contain a Linux service with the kernel's own mechanisms, recover it from a clean
base."""

__version__ = "0.1.0"
