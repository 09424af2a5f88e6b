"""Who this process is, as the console and the heartbeat name it: ``host:pid``."""

from __future__ import annotations

import os
import socket


def host() -> str:
    return socket.gethostname()


def process_id() -> str:
    """``host:pid`` of this process; read on every call, so a forked worker gets its own."""
    return f"{host()}:{os.getpid()}"
