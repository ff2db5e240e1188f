"""Command-line pieces the server and the client share: one-line errors, --version, ports."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import Callable, NoReturn, TypeVar

from chatroom import __version__

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5050


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad argument is reported in one line on stderr instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def make_parser(prog: str, description: str) -> OneLineErrorParser:
    parser = OneLineErrorParser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def add_address_arguments(
    parser: argparse.ArgumentParser, host_help: str, lowest_port: int, port_help: str
) -> None:
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"{host_help} (default: %(default)s)")
    parser.add_argument(
        "--port",
        type=int_in_range(lowest_port, 65535),
        default=DEFAULT_PORT,
        help=f"{port_help} (default: %(default)s)",
    )


def int_in_range(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from low to high, with a message that says so."""
    return _number_in_range(int, "a whole number", low, high)


def float_in_range(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a number from low to high, with a message that says so."""
    return _number_in_range(float, "a number", low, high)


_N = TypeVar("_N", int, float)


def _number_in_range(
    parse: Callable[[str], _N], noun: str, low: _N, high: _N
) -> Callable[[str], _N]:
    def convert(text: str) -> _N:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not between {low} and {high}")
        return value

    return convert


def add_password_file_argument(group: argparse._ArgumentGroup, help_text: str) -> None:
    """--password-file FILE, read into args.password, on both programs."""
    group.add_argument(
        "--password-file", type=password_file, metavar="FILE", dest="password", help=help_text
    )


def password_file(path: str) -> str:
    """An argparse type: the password in a file (its first line, without the spaces around
    it), so that it never shows in a command line anyone on the machine can list."""
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            password = file.readline().strip()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {describe(exc)}") from None
    if not password:
        raise argparse.ArgumentTypeError(f"{path} holds no password on its first line")
    return password


def fail(prog: str, message: str) -> int:
    """Reports a fatal error as one line on stderr and gives the exit status for it."""
    print(f"{prog}: {message}", file=sys.stderr)
    return 1


def describe(exc: OSError) -> str:
    """The OS's short words for an error ("Connection refused"), without the call's details;
    "unknown host" for a host name the resolver does not know."""
    # socket.create_server() re-raises a resolver error as a plain OSError with its EAI_* code,
    # which os.strerror() does not know ("Unknown error -2"): the resolver's error is its context.
    context = exc.__context__
    if isinstance(context, socket.gaierror) and context.errno == exc.errno:
        exc = context
    if isinstance(exc, socket.gaierror):
        return "unknown host" if exc.errno == socket.EAI_NONAME else exc.strerror or str(exc)
    if exc.errno:
        return os.strerror(exc.errno)
    return exc.strerror or str(exc)
