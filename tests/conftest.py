"""Test-session setup shared by every test module."""
from __future__ import annotations

import os

# libgomp threads busy-wait between parallel regions by default; on a 2-core machine
# shared with subprocesses (DDP and fault tests) that turns millisecond ops into seconds.
# It must be set before torch is imported, which is why it lives here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
