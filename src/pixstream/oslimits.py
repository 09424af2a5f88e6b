"""Operating-system limits the server needs: enough open files for its connections.

Imported by gunicorn's master before it forks the workers, so it imports only
the standard library (psycopg must not be imported before gevent patches a worker).
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

# Descriptors a worker holds besides its client connections: the listening
# socket, its pool and LISTEN connections, metric files, logs, gevent's pipes.
HEADROOM = 256


@dataclass(frozen=True, slots=True)
class OpenFiles:
    """The open-files limit (RLIMIT_NOFILE) after raising it, against what is wanted."""

    soft: int  # in force now; resource.RLIM_INFINITY for no limit
    hard: int
    wanted: int
    error: str | None = None  # why it could not be raised, if it could not

    @property
    def enough(self) -> bool:
        return self.soft == resource.RLIM_INFINITY or self.soft >= self.wanted

    def __str__(self) -> str:
        def show(value: int) -> str:
            return "unlimited" if value == resource.RLIM_INFINITY else str(value)

        text = f"open files limit {show(self.soft)} (hard limit {show(self.hard)})"
        if not self.enough:
            text += (
                f", below the {self.wanted} that worker_connections plus {HEADROOM} need:"
                " connections past it fail (raise the hard limit: ulimit -Hn, LimitNOFILE=)"
            )
        if self.error:
            text += f"; raising it failed: {self.error}"
        return text


def raise_open_files_limit(wanted: int) -> OpenFiles:
    """Raise this process's soft open-files limit to its hard limit; forked workers inherit it.

    Most systems start processes at a soft limit of 1,024, far below the
    10,000 long polls a gevent worker holds. The soft limit can be raised up to
    the hard one without privileges. With no hard limit, the soft one is
    raised to ``wanted`` only: the kernel caps it below infinity anyway.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted)
    error = None
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:  # e.g. macOS caps the soft limit at OPEN_MAX
            error = str(exc)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return OpenFiles(soft, hard, wanted, error)
