"""What every command line shares: how options are read, the number types, and how an error
ends a command (one line on stderr, exit 2; a closed stdout pipe ends quietly).

  train.py   --key=value options of the config (config.parse_overrides) and the run's own
  eval.py, captions.py, backbone.py, synthetic.py, tinyclip.py   argparse, with the types below
Both read a repeated option the same way: the last value wins.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable, Sequence

TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes"), ("0", "false", "no")


def split_options(args: Sequence[str]) -> list[tuple[str, str]]:
    """`--key=value`, `--key value` and a bare `--flag` (= "true") as (key, value) pairs in
    order, keys with '_' for '-'. Anything else is a one-line ValueError."""
    pairs, i, args = [], 0, list(args)
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or a == "--":
            raise ValueError(f"unexpected argument {a!r} (use --key=value)")
        if "=" in a:
            k, v = a[2:].split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            k, v = a[2:], args[i + 1]
            i += 1
        else:
            k, v = a[2:], "true"
        pairs.append((k.replace("-", "_"), v))
        i += 1
    return pairs


def last_value(pairs: Sequence[tuple[str, str]], key: str) -> str | None:
    """The value a repeated option ends with (as argparse reads one), or None."""
    return next((v for k, v in reversed(pairs) if k == key), None)


def parse_bool(text: str) -> bool:
    if text.lower() not in TRUE_WORDS + FALSE_WORDS:
        raise ValueError(f"expected true or false, got {text!r}")
    return text.lower() in TRUE_WORDS


def integer_from(least: int) -> Callable[[str], int]:
    """The one integer type: an integer >= least (argparse reports its ArgumentTypeError)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if value < least:
            raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {text!r}")
        return value
    parse.__name__ = f"integer >= {least}"     # what argparse names in its message
    return parse


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def os_error_line(e: OSError) -> str:
    """An OSError that reached a command line, as its one line: the file it names and why."""
    if e.filename is None:
        return e.strerror or str(e)
    return f"{e.filename}: {e.strerror or e}"


def quiet_broken_pipe() -> int:
    """stdout's reader went away (`eval.py ... | head`): stop quietly, as Unix tools do. Later
    writes (Python's own flush at exit) go to /dev/null; the status is a shell's for SIGPIPE."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141


def print_error(message: str) -> None:
    for line in str(message).splitlines() or [""]:      # a list of missing pieces: one line each
        print(f"error: {line}", file=sys.stderr)


def run_command(body: Callable[[], int | None]) -> int:
    """The one way a command ends: `body`'s status (None = 0); a ValueError (the project's
    DataError is one) or a missing file as `error: ...` lines and 2; any other OSError as one
    line naming its file and 2; a reader that closed stdout quietly, 141."""
    try:
        code = body() or 0
        sys.stdout.flush()           # a closed pipe shows here, not in Python's flush at exit
    except BrokenPipeError:
        return quiet_broken_pipe()
    except (ValueError, FileNotFoundError) as e:
        print_error(str(e))
        return 2
    except OSError as e:
        print_error(os_error_line(e))
        return 2
    return code
