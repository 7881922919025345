"""How the `keynode` command line ends: exit codes per class of failure, and the
one-line (or JSON) report of an error on stderr. Kept apart from the commands
(cli.py) so that both stay readable."""

from __future__ import annotations

import argparse
import enum
import json
import os
import sys
import traceback
from typing import Any, NoReturn

from proxy.app.errors import (
    ConfigError,
    ControlRequestFailed,
    ControlUnreachable,
    NodeDirectoryError,
    PortForwardError,
)
from proxy.identity.errors import IdentityError, KeynodeError

PROGRAM = "keynode"


class ExitCode(enum.IntEnum):
    OK = 0
    FAILURE = 1  # anything unexpected (a bug: rerun with --debug and report it)
    USAGE = 2  # bad command line (argparse uses 2 too)
    CONFIG = 3  # the config file is unreadable or invalid
    IDENTITY = 4  # no identity in the node directory, or keygen would overwrite it
    CONTROL_UNREACHABLE = 5  # no running node answers on the control socket
    REQUEST_FAILED = 6  # the node refused or failed the request
    NETWORK = 7  # cannot bind or reach an address
    DEMO_FAILED = 8  # `keynode demo` ran and its checks failed
    INTERRUPTED = 130  # SIGINT before the work was done


class CommandError(KeynodeError):
    """A failure the CLI reports as one line with a chosen exit code."""

    def __init__(self, message: str, code: ExitCode) -> None:
        super().__init__(message)
        self.code = code


class UsageError(CommandError):
    """The command line does not parse (argparse's complaint, exit code 2)."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message, ExitCode.USAGE)
        self.parser = parser
        self.message = message


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its usage errors raised (main prints them, as text or JSON)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self, message)


def exit_code_for(error: BaseException) -> ExitCode:
    if isinstance(error, CommandError):
        return error.code
    if isinstance(error, ConfigError):
        return ExitCode.CONFIG
    if isinstance(error, (NodeDirectoryError, IdentityError)):
        return ExitCode.IDENTITY
    if isinstance(error, ControlUnreachable):
        return ExitCode.CONTROL_UNREACHABLE
    if isinstance(error, (PortForwardError, OSError)):
        return ExitCode.NETWORK
    if isinstance(error, (ControlRequestFailed, KeynodeError)):
        return ExitCode.REQUEST_FAILED
    return ExitCode.FAILURE


def unwrap(error: BaseException) -> BaseException:
    """The single failure inside nested exception groups (trio nurseries wrap)."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def error_document(error: BaseException, message: str, code: int) -> dict[str, Any]:
    """What --json prints on stderr for a failure (README: "Errors")."""
    document: dict[str, Any] = {"error": type(error).__name__, "message": message, "exit_code": code}
    if isinstance(error, ControlRequestFailed):  # the node's own error type and status
        document.update(node_error=error.error, http_status=error.status)
    return document


def fail(command: str, error: BaseException, debug: bool, json_errors: bool = False) -> NoReturn:
    if debug:
        traceback.print_exception(error)
    error = unwrap(error)
    if isinstance(error, BrokenPipeError):
        stdout_gone()
    code = ExitCode.INTERRUPTED if isinstance(error, KeyboardInterrupt) else exit_code_for(error)
    message = str(error) or type(error).__name__
    if isinstance(error, KeyboardInterrupt):
        message = "interrupted"
    elif isinstance(error, UsageError):
        message = error.message
    elif isinstance(error, OSError) and error.strerror:
        message = f"{error.strerror}" + (f": {error.filename}" if error.filename else "")
    if code is ExitCode.FAILURE and not debug:
        message = f"{type(error).__name__}: {message} (unexpected; rerun with --debug and report it)"
    if json_errors:
        print(json.dumps(error_document(error, message, code)), file=sys.stderr)
    elif isinstance(error, UsageError):
        error.parser.print_usage(sys.stderr)
        print(f"{error.parser.prog}: error: {message}", file=sys.stderr)
    else:
        print(f"{PROGRAM} {command}: {message}", file=sys.stderr)
    sys.exit(code)


def flush_stdout() -> None:
    """Flush now, so a closed pipe shows here and not in the interpreter's flush at exit."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        stdout_gone()


def stdout_gone() -> NoReturn:
    """The reader of our output went away (`keynode status | head -1`): that is its
    choice, not our failure. Python's advice: point stdout at devnull so the flush at
    exit does not fail again, and leave quietly."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    sys.exit(ExitCode.OK)
