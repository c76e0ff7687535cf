"""Arguments shared by the subcommands: ``--config FILE`` and trailing ``section.key=value``."""

import argparse

from sidvid_rec.config import Config, load_config


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=None,
                        help="YAML config file or short name such as ml-100k/hstu (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, e.g. train.epochs=3 model.mode=sid_id")


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)
