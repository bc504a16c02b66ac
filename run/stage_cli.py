"""What the stage scripts share: one-line errors with exit code 2, and setting precedence."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from hunyuan_tpu.files import InputError

EXIT_BAD_INPUT = 2


class Parser(argparse.ArgumentParser):
    """argparse with a single-line error message (usage stays available through --help)."""

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(EXIT_BAD_INPUT)


def resolve(
    args: argparse.Namespace, config: dict[str, Any], defaults: dict[str, tuple[type, Any]], source: str
) -> dict[str, Any]:
    """Each setting from the command line if given, else from the stage config.json (``source``),
    else its default. ``defaults`` maps a setting to (type, default value)."""
    out = {}
    for key, (kind, default) in defaults.items():
        value = getattr(args, key, None)  # settings without a flag (task) come from the config
        if value is None and config.get(key) is not None:
            try:
                value = kind(config[key])
            except (TypeError, ValueError):
                raise InputError(f"{source}: {key}={config[key]!r} is not a valid {kind.__name__}") from None
        out[key] = default if value is None else value
    return out


def run_main(main: Callable[[], int]) -> None:
    """Run a stage; bad input ends in one line on stderr and exit code 2."""
    try:
        code = main()
    except InputError as e:
        sys.stderr.write(f"error: {e}\n")
        code = EXIT_BAD_INPUT
    sys.exit(code)
