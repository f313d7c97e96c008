"""LM-Infinite on a hand-written Llama forward pass (README.md gives the reading order)."""

import os
import signal
import sys
from pathlib import Path


def interrupted(*_):
    """Ctrl-C during the seconds of imports before cli.run takes over: one line and exit code 130,
    as cli.run ends one (nothing is written yet, so nothing to clean up)."""
    os.write(2, b"interrupted\n")  # not print(): sys.stderr may be mid-write or already closed
    os._exit(130)


# `python -m lminf_min.X` imports this package first; generate.py and weights.py import it first
# (unless Ctrl-C is ignored, as for a job started in the background by a script)
command = Path(sys.argv[0]).name in ("-m", "generate.py", "weights.py")
if command and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, interrupted)
