"""How every `bin/` program runs: flags parsed, every error one line on stderr, library logs quiet.

    if __name__ == "__main__":
        cli.run(main)

Exit status: 0 done; 2 bad input (a flag, a file, a bundle: any `PowerInferError`, `OSError` or bad flag),
with one line `error: ...` naming the problem and the fix; 1 an internal error (a bug), also one line,
with a hint to rerun with `--verbosity=1` or `POWERINFER_JAX_TRACEBACK=1`, which print the traceback;
130 interrupted. Library INFO logs (orbax prints ~15 lines per checkpoint read, jax one per missing
backend) are hidden unless `--verbosity` is given.
"""

from __future__ import annotations

import math
import os
import sys
import traceback
from typing import Callable

from absl import app, flags, logging

from powerinfer_jax.errors import PowerInferError

FLAGS = flags.FLAGS
TRACEBACK_ENV = "POWERINFER_JAX_TRACEBACK"
EXIT_OK, EXIT_INTERNAL, EXIT_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def run(main: Callable[[list[str]], int | None]) -> None:
    """`absl.app.run(main)` with one-line errors and exit codes as in the module doc."""
    app.run(guarded(main), flags_parser=parse_flags)


def invoke(main: Callable[[list[str]], int | None], argv: list[str]) -> int:
    """Runs a program's `main` in this process as `run` would, returning the exit status (tests, the
    fuzz suite): the flags are reset first, so earlier calls leave nothing behind."""
    FLAGS.unparse_flags()
    try:
        rest = parse_flags(argv)
    except SystemExit as done:
        return int(done.code or 0)
    return guarded(main)(rest)


def parse_flags(argv: list[str]) -> list[str]:
    """Parses the flags; a bad value or an unknown flag is one `error:` line and exit status 2."""
    try:
        rest = FLAGS(argv)
        for name in FLAGS:  # absl's bounds let NaN through (every comparison with it is false)
            fl = FLAGS[name]
            if isinstance(fl.parser, flags.FloatParser) and fl.value is not None and not math.isfinite(fl.value):
                raise flags.IllegalFlagValueError(f"flag --{name}={fl.value}: must be a finite number")
    except flags.Error as err:
        _say(f"error: {_one_line(str(err))} (--help lists the flags)")
        sys.exit(EXIT_INPUT)
    return rest


def guarded(main: Callable[[list[str]], int | None]) -> Callable[[list[str]], int]:
    """`main` wrapped so no traceback reaches the user (unless asked for), with quiet library logs."""

    def wrapped(argv: list[str]) -> int:
        quiet_logs()
        try:
            return int(main(argv) or 0)
        except KeyboardInterrupt:
            _say("interrupted")
            return EXIT_INTERRUPTED
        except BrokenPipeError:  # e.g. `bin/generate ... | head -1`: the reader left; nothing to report
            _close_quietly()
            return EXIT_OK
        except (PowerInferError, OSError, app.UsageError) as err:
            _debug_traceback()
            _say(f"error: {_message(err)}")
            return EXIT_INPUT
        except MemoryError:
            _debug_traceback()
            _say("error: out of memory; try a smaller model, --quantize int8/int4 or a shorter --max_seq_len")
            return EXIT_INTERNAL
        except Exception as err:  # noqa: BLE001  (a bug: still one line, with the way to see more)
            if not _debug_traceback():
                _say(f"error: internal error ({type(err).__name__}: {_message(err)}); rerun with --verbosity=1 or "
                     f"{TRACEBACK_ENV}=1 for the traceback, and please report it")
            else:
                _say(f"error: internal error ({type(err).__name__}: {_message(err)}); please report it")
            return EXIT_INTERNAL

    return wrapped


def quiet_logs() -> None:
    """Library INFO logs off unless --verbosity was given (warnings and errors still show)."""
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
        import logging as std_logging

        std_logging.getLogger().setLevel(std_logging.WARNING)


def check_no_arguments(argv: list[str]) -> None:
    """Refuses positional arguments (every input is a flag; a stray word is usually a missing `--`)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}: every input is a --flag")


def show_tracebacks() -> bool:
    """Whether the user asked for tracebacks (--verbosity >= 1 or POWERINFER_JAX_TRACEBACK=1)."""
    env = os.environ.get(TRACEBACK_ENV, "").strip().lower()
    verbose = FLAGS.is_parsed() and FLAGS["verbosity"].present and FLAGS.verbosity >= 1
    return verbose or env not in ("", "0", "false", "no")


def _debug_traceback() -> bool:
    if show_tracebacks():
        traceback.print_exc(file=sys.stderr)
        return True
    return False


def _message(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return _one_line(f"{err.strerror}: {err.filename}")
    return _one_line(str(err) or type(err).__name__)


def _one_line(text: str, limit: int = 600) -> str:
    """Messages stay on one line (a tokenizer or JSON error can carry newlines) and bounded."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _say(line: str) -> None:
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    print(line, file=sys.stderr, flush=True)


def _close_quietly() -> None:
    # Point stdout at /dev/null so the interpreter's final flush does not raise again.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
