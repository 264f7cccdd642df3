"""The `imitate` console script and `python -m imitate`.

    imitate --help

Ctrl-C while the CLI is still importing (typer, pydantic: a good part of a second on a cold start) is caught here,
so it too exits 130 with a message rather than a traceback. `imitate/__init__.py` loads lazily for the same
reason: nothing heavy runs before this `try`.
"""

import sys

from imitate.errors import Interrupted  # no imports of its own: safe before the try


def run() -> None:
    try:
        from imitate.cli import main

        code = main()
    except KeyboardInterrupt:  # main() handles its own; this is one arriving during the imports above
        sys.stderr.write("interrupted (Ctrl-C)\n")
        code = Interrupted.exit_code
    sys.exit(code)


if __name__ == "__main__":
    run()
