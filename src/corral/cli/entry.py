"""The `corral` executable. `corral run FILE` is the launch path, timed against bwrap and
firejail: it goes straight to the library, because importing click alone (~18 ms here) costs
more than the launch itself. Every other command line, any other spelling of `run` included
(options, --help), goes through the click CLI, which runs the same function."""

from __future__ import annotations

import sys


def main() -> None:
    args = sys.argv[1:]
    if len(args) == 2 and args[0] == "run" and not args[1].startswith("-"):
        import gc

        # The launch path's imports make ~20,000 objects that all live on: the collections
        # they set off (~2 ms) free nothing. supervise.control.run turns it back on.
        gc.disable()
        # First of all, so that the kernel's wait it sets off overlaps the imports (launch.cgprime)
        from corral.launch import cgprime

        cgprime.start()
        from corral.cli.base import call_handled, run_foreground

        call_handled(run_foreground, args[1])
        return
    from corral.cli.main import main as cli_main

    cli_main(prog_name="corral")


if __name__ == "__main__":
    main()
