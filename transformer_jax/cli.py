"""`transformer-jax <command> [--flags]`: the commands are the table in commands.py.

Every command takes --config=configs/X.py (a Python file with get_config()) with --config.key=value overrides,
and --workdir=DIR. Run `transformer-jax <command> --help` for the command's flags.
"""

from __future__ import annotations

import os
import sys
import traceback

from absl import app
from absl import flags
from absl import logging

from transformer_jax import commands
from transformer_jax import host
from transformer_jax import hugepages


def usage() -> str:
  lines = [
    'usage: transformer-jax <command> [--config=configs/X.py] [--config.key=value ...] [--workdir=DIR]',
    '',
    'commands:',
  ]
  for name, command in commands.COMMANDS.items():
    first, *rest = command.summary.split('\n')
    lines.append(f'  {name:<10} {first}')
    lines.extend(f'  {"":<10} {line}' for line in rest)
  lines += ['', 'Run `transformer-jax <command> --help` for every flag.']
  return '\n'.join(lines) + '\n'


def main(argv: list[str] | None = None) -> None:
  if argv is None:  # the program's entry point, not a caller's: malloc settings for XLA's buffers (hugepages.py)
    spec = commands.COMMANDS.get(sys.argv[1]) if len(sys.argv) > 1 else None
    hugepages.reexec_if_wanted(one_heap=spec is not None and spec.one_heap)
  host.choose_platform()
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
    # config_flags reads the --config.* overrides right here, and loads the default config file (configs/tiny.py)
    names = commands.define_flags(command, argv=argv)
  except Exception as e:  # (a config file is user code: it may raise anything)
    where = _config_file_error(e, argv)
    if where is None and not isinstance(e, (AttributeError, KeyError, ValueError, TypeError)):
      raise
    if where is None:
      _bad_config(e, argv)
    print(f'error: {where}', file=sys.stderr)
    sys.exit(2)
  app.run(
    lambda args: commands.run(command, args, names),
    argv=[f'transformer-jax {command}'] + argv[2:],
    flags_parser=lambda args: _parse_flags(args, command, names),
  )


def _parse_flags(argv: list[str], command: str, names: list[str]) -> list[str]:
  """absl's parser, but a bad flag, config file or config key is one line and exit 2, not a traceback."""
  if any(a in ('-h', '--help', '-help', '--helpshort') for a in argv[1:]):
    # absl's --help lists only the main module's flags; a command's are defined in several modules.
    print(f'usage: {argv[0]} [flags]\n\n{commands.help_text(command, names)}')
    sys.exit(0)
  try:
    rest = flags.FLAGS(argv)
    verbose = any(a.startswith(('--verbosity', '-v')) for a in argv[1:])
    if not verbose:
      logging.set_verbosity(logging.WARNING)  # progress bar and result lines, not library chatter (-v 0 for INFO)
    from transformer_jax.training import faults

    faults.quiet_library_warnings(verbose)
    if flags.FLAGS.config is not None:
      list(flags.FLAGS.config.keys())  # config files load lazily: surface their errors here
    return rest
  except Exception as e:  # (a config file is user code: it may raise anything)
    where = _config_file_error(e, argv)
    if where:
      print(f'error: {where}', file=sys.stderr)
    elif isinstance(e, OSError):
      print(f'error: {str(e).splitlines()[0]}: {str(e).splitlines()[-1].strip()}', file=sys.stderr)
    elif isinstance(e, flags.Error):
      print(f'error: {e}', file=sys.stderr)
    elif isinstance(e, (AttributeError, KeyError, ValueError, TypeError)):
      _bad_config(e, argv)
    else:
      raise
  sys.exit(2)


def _config_file_arg(argv: list[str]) -> str | None:
  """The --config=FILE of argv (FILE without a `:arguments` suffix), or None."""
  for i, a in enumerate(argv):
    value = (
      a[len('--config=') :]
      if a.startswith('--config=')
      else (argv[i + 1] if a == '--config' and i + 1 < len(argv) else None)
    )
    if value is not None:
      return value.split(':', 1)[0] if '.py:' in value else value
  return None


def _config_file_error(e: BaseException, argv: list[str]) -> str | None:
  """`FILE:LINE: Error: message` when `e` came from running the --config file (or a module it imports), or
  `FILE: no get_config()`; None for anything else (a bad override key, a flag error)."""
  path = _config_file_arg(argv) or 'the config file'
  message = str(e).splitlines()[0] if str(e) else ''
  if isinstance(e, SyntaxError) and e.filename and not e.filename.startswith('<'):
    location = os.path.relpath(e.filename) if os.path.abspath(e.filename).startswith(os.getcwd()) else e.filename
    return f'{location}:{e.lineno}: {type(e).__name__}: {e.msg}'
  if isinstance(e, AttributeError) and "attribute 'get_config'" in message:
    return f'{path}: no get_config() (a config file defines get_config() returning an ml_collections.ConfigDict)'
  library = (sys.prefix, sys.base_prefix, os.path.dirname(os.__file__), os.path.dirname(commands.__file__))
  user_frames = [
    f
    for f in traceback.extract_tb(e.__traceback__)
    if not f.filename.startswith('<') and not os.path.abspath(f.filename).startswith(library)
  ]
  if not user_frames:
    return None
  frame = user_frames[-1]  # the innermost: the line that raised, in the config file or a module of the user's
  location = (
    os.path.relpath(frame.filename) if os.path.abspath(frame.filename).startswith(os.getcwd()) else (frame.filename)
  )
  return f'{location}:{frame.lineno}: {type(e).__name__}: {message}'


def _bad_config(e: Exception, argv: list[str]) -> None:
  bad = [a for a in argv[1:] if a.startswith('--config')]
  message = str(e).strip('"\'').replace('\\n', ' ').replace('\n', ' ').replace("\\'", '') or type(e).__name__
  print(f'error: unknown or bad config key ({message}) in {" ".join(bad)}', file=sys.stderr)
  sys.exit(2)


if __name__ == '__main__':
  main()
