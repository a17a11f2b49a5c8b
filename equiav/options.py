"""Options shared by the `equiav` sub-commands: the same thing has the same name, help and default
rule everywhere (`--pretrained`, `--workers`, `--device`, `--settings`, a data set's files).

Light on purpose (no torch at import): cli.py imports it to build the command tree.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

__all__ = [
    "LOG_FORMAT",
    "HelpFormatter",
    "add_dataset_inputs",
    "add_device",
    "add_pretrained",
    "add_settings",
    "add_workers",
    "read_settings",
    "resolve_device",
    "setup_logging",
    "verbosity_flags",
]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help, except where there is nothing to show:
    required options, flags, and options whose default is None (their help says what None does)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            "%(default)" in text
            or not action.option_strings
            or action.required
            or action.nargs == 0  # a flag: its presence is the value
            or action.default is None
            or action.default == argparse.SUPPRESS
        ):
            return text
        return f"{text} (default: %(default)s)"


# ---- logging ---------------------------------------------------------------------------------


def setup_logging(verbosity: int = 0) -> None:
    """INFO to stderr (which the rules redirect into the rule's log); -v: DEBUG, -q: WARNING.

    Called once per `equiav` command, whichever module runs it. Another host's handlers
    (pytest, a notebook) are left in place; only the level is set. Ranks other than 0 of a
    distributed run only warn, so that the log holds each progress line once.
    """
    level = logging.DEBUG if verbosity > 0 else logging.WARNING if verbosity < 0 else logging.INFO
    if verbosity <= 0 and int(os.environ.get("RANK", "0") or 0) > 0:
        level = logging.WARNING
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
    root.setLevel(level)


def verbosity_flags(verbosity: int) -> list[str]:
    """The top-level flags that give a re-invoked `equiav` (equiav launch) the same verbosity."""
    return ["-v"] if verbosity > 0 else ["-q"] if verbosity < 0 else []


# ---- settings --------------------------------------------------------------------------------


def read_settings(value: str) -> dict[str, Any]:
    """``--settings``: a JSON object, or the path of a file holding one."""
    text = value
    if not value.lstrip().startswith(("{", "[")):
        path = Path(value)
        if not path.is_file():
            raise argparse.ArgumentTypeError(
                f"{value!r} is neither a JSON object nor a file; give the object ('{{\"key\": ...}}') "
                "or the path of a .json file holding it"
            )
        text = path.read_text()
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as err:
        where = "" if text is value else f" in {value}"
        raise argparse.ArgumentTypeError(
            f'not valid JSON{where} ({err}); give an object such as \'{{"recipe": "esc50"}}\''
        ) from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object ({{...}}), got a {type(parsed).__name__}")
    return parsed


def add_settings(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--settings",
        type=read_settings,
        required=True,
        metavar="JSON|FILE",
        help=f"{what}: a JSON object, or the path of a JSON file holding one",
    )


# ---- model, data, device ---------------------------------------------------------------------


def add_pretrained(p: argparse.ArgumentParser, help: str = "the pre-trained weights (the pre-train stage's model.pt)",
                   *, required: bool = True) -> None:  # fmt: skip
    p.add_argument("--pretrained", required=required, metavar="PATH", help=help)


def add_dataset_inputs(p: argparse.ArgumentParser, *, classes: bool = True) -> None:
    """The files the data stages leave of a data set, which training and evaluation read."""
    group = p.add_argument_group("data set")
    group.add_argument("--usable", required=True, type=Path, help="usable.csv of the availability stage")
    group.add_argument(
        "--norm-stats", required=True, type=Path, help="norm_stats.json of the data set (keys mean, std)"
    )
    if classes:
        group.add_argument("--classes", required=True, type=Path, help="classes.csv of the data set")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", default="auto", help="torch device: auto (cuda when available, else cpu), cpu, cuda, cuda:1, ..."
    )


def resolve_device(name: str) -> Any:
    """The torch.device of ``--device`` (auto: cuda when available, else cpu)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise SystemExit(f"--device {name!r} is not a torch device ({err}); give auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine; give --device cpu (or auto)")
    return device


def add_workers(p: argparse.ArgumentParser, default: int, help: str) -> None:
    p.add_argument("--workers", type=int, default=default, metavar="N", help=help)
