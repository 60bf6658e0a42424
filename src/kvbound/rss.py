"""Process memory as the OS reports it (Linux ``/proc``; ``resource`` elsewhere).

``peak_rss_bytes`` is the process high-water mark (``VmHWM``). ``reset_peak_rss`` lowers it to
the current RSS (Linux ``/proc/self/clear_refs``, value 5) so one process can measure several
runs one after another; where that is not possible it returns ``False`` and the caller should run
each measurement in a fresh process.
"""

from __future__ import annotations

import os
import resource
import sys


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def current_rss_bytes() -> int:
    """Resident set size now."""
    got = _status_bytes("VmRSS")
    if got is not None:
        return got
    return peak_rss_bytes()  # best effort without /proc


def peak_rss_bytes() -> int:
    """Highest resident set size of this process since start (or since :func:`reset_peak_rss`)."""
    got = _status_bytes("VmHWM")
    if got is not None:
        return got
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Reset the high-water mark to the current RSS; ``False`` if the OS does not allow it."""
    try:
        fd = os.open("/proc/self/clear_refs", os.O_WRONLY)
    except OSError:
        return False
    try:
        os.write(fd, b"5")
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
