"""What every command line shares: how options are read, the number types, how an error
ends a command (one line on stderr, exit 2; a closed stdout pipe ends quietly), and the check
that no output replaces an input or a user's file.

  train.py   --key=value options of the config (config.parse_overrides) and the run's own
  eval.py, captions.py, backbone.py, synthetic.py, tinyclip.py   argparse, with the types below
Both read a repeated option the same way: the last value wins.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import stat
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator, Sequence

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
    from data import shown_path  # a name holding a newline stays on its line

    if e.filename is None:
        return e.strerror or str(e)
    return f"{shown_path(e.filename)}: {e.strerror or e}"


def _file_identity(path: str | os.PathLike) -> tuple[int, int] | None:
    """(device, inode) of the file or folder `path` is or leads to (through any links); None
    when there is none yet, or when it is a device, FIFO or socket (written through, never
    replaced: two names of /dev/stdout lose nothing)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) else None


def check_outputs_apart(outputs: Sequence[tuple[str, str | os.PathLike | None]],
                        inputs: Sequence[tuple[str, str | os.PathLike | None]]) -> None:
    """The one check that a command's outputs destroy none of its inputs, made before any work:
    an output that is the same file or folder as an input (device and inode, through links and
    hard links), or as another output (a file not written yet: the same resolved path), is a
    one-line ValueError naming both. Each item is (option, path); a None or '' path is skipped."""
    from data import shown_path

    known = [(name, path, _file_identity(path)) for name, path in inputs if path]
    written: list[tuple[str, str | os.PathLike, tuple[int, int] | None, str]] = []
    for option, out in outputs:
        if not out:
            continue
        identity, resolved = _file_identity(out), os.path.realpath(out)
        named = f"{option}={shown_path(out)}"
        for name, path, other in known:
            if identity is not None and identity == other:
                raise ValueError(f"{named}: is the input {name} {shown_path(path)}; writing it would destroy it: "
                                 f"choose another {option}")
        for name, path, other, other_resolved in written:
            if (identity is not None and identity == other) or resolved == other_resolved:
                raise ValueError(f"{named}: is also {name} {shown_path(path)}; one would overwrite the other: "
                                 f"choose another {option}")
        written.append((option, out, identity, resolved))


def check_own_folder(folder: str | os.PathLike, writer: str, own: Callable[[str], bool], advice: str) -> None:
    """A results folder is written into only when it holds nothing but what `writer` writes
    (`own` judges an entry's name): a user's file there is refused in one line naming it, before
    anything is written or removed, never overwritten."""
    from data import DataError, shown_path

    folder = Path(folder)
    if not folder.is_dir():
        return
    foreign = sorted(p.name for p in folder.iterdir() if not own(p.name))
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise DataError(folder, f"holds '{shown_path(foreign[0])}'{more}, which {writer} did not write; {advice}")


def quiet_broken_pipe() -> int:
    """stdout's reader went away (`eval.py ... | head`): stop quietly, as Unix tools do. Later
    writes (Python's own flush at exit) go to /dev/null; the status is a shell's for SIGPIPE."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141


def print_error(message: str) -> None:
    for line in str(message).splitlines() or [""]:      # a list of missing pieces: one line each
        print(f"error: {line}", file=sys.stderr)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGTERM (what a cluster scheduler sends before it kills a job), raised where the command
    is, as Ctrl-C raises KeyboardInterrupt: both take the same way out."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def interrupt_code(e: KeyboardInterrupt) -> int:
    """A shell's status for a command its signal stopped: 128 + the signal's number."""
    return 128 + getattr(e, "signum", signal.SIGINT)


def interrupt_words(e: KeyboardInterrupt) -> str:
    return f"interrupted by {e}" if isinstance(e, Interrupted) else "interrupted"


def _raise_interrupted(signum: int, frame) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block has run (they are delivered as it ends). For a
    thread's start and join: an interrupt inside Thread.start() (which waits for the thread to
    run) or inside the join left the thread running into interpreter exit, where a thread
    inside torch aborts the process ("terminate called without an active exception", status
    -6, about one stop in four right after an epoch's state was saved)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def run_command(body: Callable[[], int | None]) -> int:
    """The one way a command ends: `body`'s status (None = 0); a ValueError (the project's
    DataError is one) or a missing file as `error: ...` lines and 2; any other OSError as one
    line naming its file and 2; a reader that closed stdout quietly, 141; Ctrl-C or SIGTERM
    as a `stopped: interrupted` line and 130 or 143 (a command that keeps something to go on
    from says so in its own line)."""
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupted) if in_main else None
    try:
        code = body() or 0
        sys.stdout.flush()           # a closed pipe shows here, not in Python's flush at exit
    except KeyboardInterrupt as e:
        print(f"stopped: {interrupt_words(e)}", file=sys.stderr)
        return interrupt_code(e)
    except BrokenPipeError:
        return quiet_broken_pipe()
    except (ValueError, FileNotFoundError) as e:
        print_error(str(e))
        return 2
    except OSError as e:
        print_error(os_error_line(e))
        return 2
    finally:
        if in_main and previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return code


def duration_words(seconds: float) -> str:
    """`42 s`, `7 min 5 s`, `3 h 12 min`: a duration as people read it."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def size_words(num_bytes: int) -> str:
    """`0 B`, `512 KiB`, `7.5 GiB`."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} B"


class DefaultsHelp(argparse.HelpFormatter):
    """--help that shows each option's default, unless its help says it already or it has none."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        if "default" in text or action.required or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: {action.default})"
