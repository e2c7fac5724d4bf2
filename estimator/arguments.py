"""The option table (estimator/options.py) as argparse flags, for both command lines:
`python -m estimator` and `python -m lowrank.train`.

An option not given stays None, so the dataclass default applies; an option the chosen method
does not have is an error naming the methods it belongs to; a usage error is one line and exit
status 2.
"""

from __future__ import annotations

import argparse
from typing import Any

from .config import METHODS, MethodConfig, TrainSetup, method_config
from .options import METHOD_OPTIONS, SETUP_OPTIONS, Option, as_flags


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 2 (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())}\n")


def add_options(parser, options: tuple[Option, ...]) -> None:
    """Each option as a flag whose default is None (not given: the dataclass default applies)."""
    for option in options:
        if option.type is bool:
            parser.add_argument(option.flag, dest=option.dest, action=argparse.BooleanOptionalAction, default=None,
                                help=option.help)
        else:
            metavar = None if option.choices else option.dest.upper()
            parser.add_argument(option.flag, dest=option.dest, type=option.type, default=None,
                                choices=option.choices, help=option.help, metavar=metavar)


def add_training_arguments(parser: argparse.ArgumentParser, method_required: bool = True) -> None:
    """--method plus every method and setup option."""
    parser.add_argument("--method", required=method_required, choices=tuple(METHODS), help="training method")
    add_options(parser.add_argument_group("method options (each applies to some methods)"), METHOD_OPTIONS)
    add_options(parser.add_argument_group("training setup"), SETUP_OPTIONS)


def given(args: argparse.Namespace, options: tuple[Option, ...]) -> dict[str, Any]:
    """{field: value} of the options given on the command line."""
    return {o.field: getattr(args, o.dest) for o in options if getattr(args, o.dest, None) is not None}


def configs_from_args(args: argparse.Namespace) -> tuple[MethodConfig, TrainSetup]:
    """The method dataclass and TrainSetup the parsed options describe; ValueError on misuse."""
    method = args.method
    problems, options = [], {}
    for option in METHOD_OPTIONS:
        value = getattr(args, option.dest)
        if value is None:
            continue
        if method not in option.methods:
            problems.append(f"{option.flag} does not apply to --method {method}; it is an option of "
                            f"{', '.join(option.methods)}")
        else:
            options[option.field] = value
    if problems:
        raise ValueError("; ".join(problems))
    try:
        return method_config(method, **options), TrainSetup(**given(args, SETUP_OPTIONS))
    except ValueError as err:
        raise ValueError(as_flags(str(err), method)) from None
