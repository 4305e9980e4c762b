"""The name rules, on their own so the launch path can check a name without the manifest model
(which imports pydantic, ~80 ms)."""

import re

SERVICE_NAME = re.compile(r"^[a-z][a-z0-9-]{0,15}$")
PROCESS_NAME = re.compile(r"^[a-z][a-z0-9]{0,7}$")


def veth_name(service: str) -> str:
    """The host side of a `network = "own"` service's veth: interface names have at most 15
    bytes, service names up to 16 (the host table matches it by name, host.netns makes it)."""
    import hashlib  # here: `corral run` loads this module, and hashlib loads OpenSSL

    return "crn" + hashlib.sha256(service.encode()).hexdigest()[:10]
