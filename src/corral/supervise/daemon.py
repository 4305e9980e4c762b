"""`corral up`'s supervisor process: `python -m corral.supervise.daemon NAME` (control.up starts
it in the background). Before importing the supervisor it starts priming the kernel's cgroup
migration lock (launch.cgprime) and turns the garbage collector off, as `corral run` does
(cli.entry): the imports take as long as a grace period, which then no longer delays the
service's first process."""

from __future__ import annotations

import gc
import sys


def main(argv: list[str]) -> int:
    gc.disable()  # the imports' objects all live on: collections during them free nothing
    from corral.launch import cgprime

    cgprime.start()  # runs until the holder's fork (launch.pipeline.spawn)
    from corral.supervise import supervisor

    gc.freeze()
    gc.enable()
    return supervisor.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
