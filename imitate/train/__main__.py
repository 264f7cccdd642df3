"""`python -m imitate.train DATA --out DIR [...]`: `imitate train` without the CLI, e.g. for torchrun.

torchrun --nproc_per_node 2 -m imitate.train DATA --out DIR --set train.threads=1
"""

from __future__ import annotations

import argparse
import sys

from imitate.errors import ImitateError
from imitate.train.commands import train_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imitate.train", description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--out", required=True)
    parser.add_argument("--model")
    parser.add_argument("--config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    try:
        train_command(args.data, args.out, args.model, args.config, args.overrides, args.check)
    except ImitateError as exc:
        print(exc.one_line(), file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
