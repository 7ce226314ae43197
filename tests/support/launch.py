"""Start a command in a prepared state, for tests that need a child process set up before it runs.

    python launch.py [--sigint-default] [--file-size-limit BYTES] -- COMMAND [ARG...]

resets what was asked, then replaces itself with COMMAND (`os.execv`). This is what `subprocess`'s `preexec_fn` would
do, without its hazard: `preexec_fn` makes `subprocess` fork and run Python in the child before `exec`, which runs
the parent's `pthread_atfork` handlers, and gRPC's, with the servers and channels of earlier tests alive in the test
process, can abort that child before it starts (seen once as "epoll_wait error: Bad file descriptor" and SIGABRT).
A launcher needs no `preexec_fn`, so `subprocess` starts it without running any of them.
"""

import argparse
import os
import resource
import signal
import sys


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sigint-default", action="store_true",
                        help="SIGINT back to its default: a shell running the suite as a background job starts it "
                             "ignored, which the command would inherit (and then never see Ctrl-C)")
    parser.add_argument("--file-size-limit", type=int, help="RLIMIT_FSIZE for the command, in bytes")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    options = parser.parse_args(argv)
    command = options.command[1:] if options.command[:1] == ["--"] else options.command
    if options.sigint_default:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    if options.file_size_limit is not None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (options.file_size_limit, options.file_size_limit))
    os.execv(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
