"""What every command-line tool here shares: flag values checked when parsed, and one line for an
error.

A value that can never work (`--frames 0`) fails once at start, not as an error row per video that a
rerun then skips. An error a user can cause ends the run with `error: ...` on one line; anything
else is a bug, and its traceback is printed with every secret scrubbed from it.
"""

import argparse
import sys
import traceback


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Every default in --help, except where there is none to show (a flag that is off, a value that
    comes from elsewhere: its help says from where)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse, with every default shown in --help, no abbreviations (`--max-new-token` is not
    quietly `--max-new-tokens`), and a mistake in the flags told in one line, with the flag meant
    when one is close, not the whole usage text."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, formatter_class=_Help, allow_abbrev=False, **kwargs)

    def error(self, message):
        import difflib
        flags = [o for a in self._actions for o in a.option_strings]
        unknown = (
            [w for w in message.split() if w.startswith("--")] if "unrecognized" in message else []
        )
        near = [
            m
            for w in unknown
            for m in difflib.get_close_matches(w.split("=")[0], flags, n=1, cutoff=0.75)
        ]
        hint = f"did you mean {' '.join(near)}? " if near else ""
        self.exit(2, f"error: {message} ({hint}see {self.prog} --help)\n")


def _typed(kind, ok, what):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r}: must be {what}")
        return value
    parse.__name__ = kind.__name__   # argparse names the type in its messages
    return parse


positive_int = _typed(int, lambda v: v > 0, "a whole number above 0")
count = _typed(int, lambda v: v >= 0, "a whole number, 0 or more")
positive = _typed(float, lambda v: 0 < v < float("inf"), "a number above 0")
non_negative = _typed(float, lambda v: 0 <= v < float("inf"), "a number, 0 or more")
fraction = _typed(float, lambda v: 0 <= v <= 1, "a share from 0 to 1")


def shape(text):
    """"4,12,12" -> (4, 12, 12), three whole numbers above 0."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be three whole numbers above 0, as T,H,W")
    return values


def shard(text):
    """"K/N" -> (K, N), with 0 <= K < N: the shard of the videos this node takes."""
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        k = n = 0
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"{text!r}: expected K/N with 0 <= K < N")
    return k, n


class Stop(Exception):
    """The run must end: what failed, and what to do about it (one line)."""


def run(main, user_errors=(OSError, ValueError), scrub=str):
    """main(), with the errors a user can cause as one line and a non-zero exit."""
    try:
        return main()
    except KeyboardInterrupt:   # 130, as a shell reports a Ctrl-C
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except user_errors as e:
        sys.exit(f"error: {scrub(e) or type(e).__name__}")
    except Exception:
        sys.stderr.write(scrub(traceback.format_exc()))
        sys.exit(1)
