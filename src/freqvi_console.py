"""Entry point of the ``freqvi`` console script, outside the ``freqvi`` package.

A console script imports its entry point's module before calling it; importing anything
inside ``freqvi`` imports torch, Pyro and freqvi itself (a second or more), and a Ctrl-C
then would end in a traceback. This module imports nothing heavy: it catches Ctrl-C
during that import (and any that escapes :func:`freqvi.cli.main`'s own handling), prints
one line and returns 130.
"""

from __future__ import annotations

import signal
import sys

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a process that Ctrl-C ended


def main() -> int:
    """Runs :func:`freqvi.cli.main` on ``sys.argv``; Ctrl-C at any point is exit status 130, one line."""
    try:
        from freqvi.cli import main as run

        status = run()
    except KeyboardInterrupt:
        status = None
    # The process ends next: a Ctrl-C from here on would interrupt this report or an exit handler
    # (torch registers some) with a traceback, so it waits.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if status is None:
        print("freqvi: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return status


if __name__ == "__main__":
    sys.exit(main())
