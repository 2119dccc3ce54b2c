"""The ``pneumojax`` command (and ``python -m pneumojax``): starts the process as it runs
fastest (:mod:`pneumojax.hugepages`, before anything heavy is imported), then the CLI."""

import sys

from pneumojax import hugepages


def main() -> None:
    try:
        hugepages.reexec()
        from pneumojax.cli import main as cli  # noqa: PLC0415

        cli(prog_name="pneumojax")
    except KeyboardInterrupt:  # Ctrl-C while the heavy modules load, before a command runs
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
