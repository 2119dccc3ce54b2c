"""The ``pneumojax`` command (and ``python -m pneumojax``): starts the process as it runs
fastest (:mod:`pneumojax.hugepages`, before anything heavy is imported), then the CLI."""

from pneumojax import hugepages


def main() -> None:
    hugepages.reexec()
    from pneumojax.cli import main as cli  # noqa: PLC0415

    cli(prog_name="pneumojax")


if __name__ == "__main__":
    main()
