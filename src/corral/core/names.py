"""The name rules, on their own so the launch path can check a name without the manifest model
(which imports pydantic, ~80 ms)."""

import re

SERVICE_NAME = re.compile(r"^[a-z][a-z0-9-]{0,15}$")
PROCESS_NAME = re.compile(r"^[a-z][a-z0-9]{0,7}$")
