"""`transformer-jax <command> [--flags]`: the commands are the table in commands.py.

Every command takes --config=configs/X.py (a Python file with get_config()) with --config.key=value overrides,
and --workdir=DIR. Run `transformer-jax <command> --help` for the command's flags.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from absl import logging

from transformer_jax import commands
from transformer_jax import hugepages


def usage() -> str:
  lines = ['usage: transformer-jax <command> [--config=configs/X.py] [--config.key=value ...] [--workdir=DIR]', '',
           'commands:']
  for name, command in commands.COMMANDS.items():
    first, *rest = command.summary.split('\n')
    lines.append(f'  {name:<10} {first}')
    lines.extend(f'  {"":<10} {line}' for line in rest)
  lines += ['', 'Run `transformer-jax <command> --help` for every flag.']
  return '\n'.join(lines) + '\n'


def main(argv: list[str] | None = None) -> None:
  if argv is None:  # the program's entry point, not a caller's: malloc settings for XLA's buffers (hugepages.py)
    hugepages.reexec_if_wanted(one_heap=sys.argv[1:2] == ['train'])
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ('-h', '--help', 'help'):
    print(usage())
    sys.exit(0 if len(argv) >= 2 else 2)
  command = argv[1]
  if command not in commands.COMMANDS:
    print(f'error: unknown command {command!r}; expected one of {", ".join(commands.COMMANDS)}', file=sys.stderr)
    sys.exit(2)
  if commands.repo_root() not in sys.path:
    sys.path.insert(0, commands.repo_root())  # lets configs/*.py import each other (`from configs import tiny`)

  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TensorFlow only feeds data here: keep its banners quiet
  try:
    commands.define_flags(command)  # config_flags reads --config.* overrides from sys.argv right here
  except (AttributeError, KeyError, ValueError, TypeError) as e:
    _bad_config(e, argv)
  app.run(lambda args: commands.run(command, args), argv=[f'transformer-jax {command}'] + argv[2:],
          flags_parser=_parse_flags)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, but a bad flag or config key is one line and exit 2, not a traceback."""
  if any(a in ('-h', '--help', '-help', '--helpshort') for a in argv[1:]):
    # absl's --help lists only the main module's flags; this command's live in commands.py.
    print(f'usage: {argv[0]} [flags]\n\n{flags.FLAGS.module_help("transformer_jax.commands")}')
    if argv[0].endswith(' train'):
      from transformer_jax import faults  # pylint: disable=g-import-not-at-top
      print(f'\n{faults.SIGNALS_HELP}')
    sys.exit(0)
  try:
    rest = flags.FLAGS(argv)
    if not any(a.startswith(('--verbosity', '-v')) for a in argv[1:]):
      logging.set_verbosity(logging.WARNING)  # progress bar and result lines, not library chatter (-v 0 for INFO)
    if flags.FLAGS.config is not None:
      list(flags.FLAGS.config.keys())  # config files load lazily: surface their errors here
    return rest
  except OSError as e:
    print(f'error: {str(e).splitlines()[0]}: {str(e).splitlines()[-1].strip()}', file=sys.stderr)
  except flags.Error as e:
    print(f'error: {e}', file=sys.stderr)
  except (AttributeError, KeyError, ValueError, TypeError, FileNotFoundError) as e:
    _bad_config(e, argv)
  sys.exit(2)


def _bad_config(e: Exception, argv: list[str]) -> None:
  bad = [a for a in argv[1:] if a.startswith('--config')]
  message = str(e).strip('"\'').replace('\\n', ' ').replace('\n', ' ').replace("\\'", '') or type(e).__name__
  print(f'error: unknown or bad config key ({message}) in {" ".join(bad)}', file=sys.stderr)
  sys.exit(2)


if __name__ == '__main__':
  main()
