"""``tint-hf`` command line.

Each subcommand lives in its own module, which defines ``HELP`` (one line), ``add_arguments(parser)``
and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from huggingface_hub.errors import StrictDataclassError  # a config field of the wrong type

from .commands.arguments import DefaultsFormatter

SUBCOMMANDS: dict[str, str] = {
    "demo": "tint_hf.commands.demo",
    "build": "tint_hf.commands.build",
    "push": "tint_hf.commands.push",
    "eval": "tint_hf.commands.eval",
    "ppl": "tint_hf.commands.ppl",
    "prepare-data": "tint_hf.commands.prepare_data",
    "synthetic": "tint_hf.commands.synthetic",
    "convert-mesa": "tint_hf.commands.convert_mesa",
    "lm-eval": "tint_hf.commands.lm_eval_cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tint-hf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.HELP,
                                            formatter_class=DefaultsFormatter))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command])
    return int(module.run(args) or 0)


USER_ERRORS = (ValueError, KeyError, TypeError, FileNotFoundError, NotADirectoryError, ImportError,
               StrictDataclassError)


def console_main(argv: list[str] | None = None) -> int:
    """The ``tint-hf`` executable: :func:`main`, with errors in the user's input (bad values, unknown names, missing
    files or packages) reported as one ``tint-hf: error: ...`` line and exit status 2 instead of a traceback.
    ``TINT_HF_TRACEBACK=1`` shows the traceback."""
    try:
        return main(argv)
    except USER_ERRORS as error:
        if os.environ.get("TINT_HF_TRACEBACK"):
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"tint-hf: error: {message} (TINT_HF_TRACEBACK=1 shows where)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(console_main())
