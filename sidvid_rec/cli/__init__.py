"""``sidvid-rec`` command-line entry point.

Each subcommand lives in its own module of this package and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a callable taking the
parsed ``argparse.Namespace`` and returning an exit code. This module only dispatches and
turns :class:`~sidvid_rec.errors.UserError` into a one-line message and exit code 2.
"""

import argparse
import importlib
import logging
import warnings
import re
import sys
from typing import List, NoReturn, Optional

from sidvid_rec.errors import UserError

# Subcommand modules, in the order of the pipeline.
_COMMAND_MODULES = (
    "sidvid_rec.cli.data_cmd",
    "sidvid_rec.cli.embed_cmd",
    "sidvid_rec.cli.sids_cmd",
    "sidvid_rec.cli.train_cmd",
    "sidvid_rec.cli.evaluate_cmd",
    "sidvid_rec.cli.export_cmd",
    "sidvid_rec.cli.recommend_cmd",
    "sidvid_rec.cli.serve_cmd",
    "sidvid_rec.cli.pipeline_cmd",
)

_OVERRIDE = re.compile(r"^[A-Za-z_]\w*\.[A-Za-z_]\w*=")


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one stderr line (``--help`` is unchanged).

    ``add_subparsers`` makes sub-parsers of the parser's own class, so every subcommand's
    parser inherits this without naming it.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="sidvid-rec",
        description="Generative sequential recommendation with semantic IDs (SID) and vector IDs (VID).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def _quiet_third_party() -> None:
    """Silences deprecation chatter of torchrec's planner/DMP that users cannot act on."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*is_fx_tracing.*")
    for name in ("torchrec", "torch.distributed", "iopath", "torch.fx"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: Optional[List[str]] = None) -> int:
    _quiet_third_party()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse cannot take positionals after options (``stats PATH --format F key=value``):
    # collect the stray ``section.key=value`` words as overrides, reject anything else.
    unknown = [a for a in extra if not (hasattr(args, "overrides") and _OVERRIDE.match(a))]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"sidvid-rec {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"sidvid-rec {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # last line of defence: an OS error no writer or reader turned into a UserError
        reason = f"{e.strerror}: {e.filename}" if e.strerror and e.filename else (e.strerror or str(e))
        print(f"sidvid-rec {args.command}: error: {reason}".replace("\n", " "), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
