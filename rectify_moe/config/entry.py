"""What the absl entry points (train.py, eval.py) share: the `--config` flag over the schema, with overrides checked
before absl parses them (`cli.preparse`), and one-line errors."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from absl import app
from ml_collections import config_flags

from rectify_moe import log
from rectify_moe.config import cli, schema
from rectify_moe.config.fields import ConfigError


def define_config_flag(default: str | None, help_text: str) -> None:
  config_flags.DEFINE_config_file("config", default, help_text, lock_config=True)


def run(main: Callable[[Sequence[str], list[str]], None], argv: Sequence[str] | None = None, *,
        root: type = schema.RunConfig, flag: str = "config") -> None:
  """`app.run(main)` after checking the `--{flag}.*` overrides against the schema `root`; main(argv, none_paths)
  applies the Nones with `cli.apply_none(config, none_paths)`. A bad override exits 2 with one line."""
  argv = list(sys.argv if argv is None else argv)
  try:
    argv, none_paths = cli.preparse(argv, root, flag=flag)
  except ConfigError as e:
    log.error(str(e))
    sys.exit(2)
  app.run(lambda args: main(args, none_paths), argv=argv)
