"""Start a command that dies with the lab: `python -m labkit.engines.launch PARENT_PID -- CMD...`.

Linux's PR_SET_PDEATHSIG makes the kernel send SIGTERM to a process when the thread that
started it exits, even if the lab is killed with SIGKILL and its atexit and signal handlers
never run. It must be set in the child before exec. `subprocess.Popen(preexec_fn=...)` can do
that, but Python documents preexec_fn as unsafe in a process with threads (the lab has many:
telemetry readers, progress bars, the notebook kernel's), and the stdlib has no preexec-free
equivalent (`start_new_session` and `process_group` cover the process group only). So the
engine starts through this launcher: a fresh single-threaded interpreter that sets the
signal, checks that the lab is still its parent (it may have died in between), and execs the
command, which keeps the signal, the pid, the process group and the environment.

Elsewhere than Linux the signal is not available and the command simply runs; the lab's
atexit and signal handlers still stop its process groups (labkit.engines.base).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel for `sig` when our parent exits; False where prctl does not exist."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: no such call
        return False
    return prctl(PR_SET_PDEATHSIG, sig) == 0


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        sys.exit("usage: python -m labkit.engines.launch PARENT_PID -- COMMAND [ARGS...]")
    parent, cmd = int(argv[0]), argv[2:]
    set_parent_death_signal()
    if os.getppid() != parent:  # the lab died before the signal was set: start nothing
        sys.exit(1)
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main(sys.argv[1:])
