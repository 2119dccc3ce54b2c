"""``python -m pneumojax.cli``: the command line without :mod:`pneumojax.__main__`'s start."""

from pneumojax.cli import main

if __name__ == "__main__":
    main()
