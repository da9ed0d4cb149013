"""Command-line flags from a training config dataclass: one flag per field, so the train scripts
never list their options twice (field `warmup_steps` -> `--warmup-steps`, default the field's)."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any


def parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered not in ("1", "true", "yes", "0", "false", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")
    return lowered in ("1", "true", "yes")


def parse_tuple(text: str) -> tuple[float | int, ...]:
    return tuple(float(v) if "." in v else int(v) for v in text.split(","))


def config_parser(config_class: Any, description: str | None) -> argparse.ArgumentParser:
    """A parser for every field of `config_class`. A bool flag alone means true (`--eval-only`),
    or takes a value (`--noisy-training false`); a tuple is comma-separated (`--channel-mult 1,2`)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(config_class):
        default = getattr(config_class, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, type=parse_bool, nargs="?", const=True, default=default)
        elif isinstance(default, tuple):
            parser.add_argument(flag, type=parse_tuple, default=default)
        else:
            parser.add_argument(flag, type=type(default), default=default)
    return parser
