"""Machine faults as one line: a full disk (or quota) during a save, and library tracebacks kept off the terminal.

Orbax writes checkpoints in background threads and logs each failure there with a traceback (at ERROR, which the
CLI's WARNING verbosity shows): a full disk would bury the one error line under hundreds of tracebacks. The CLI diverts
those records (`divert_library_errors`) to a detail log in the temporary directory (never the workdir, which may be
the full disk) and names that file in its error line.
"""

from __future__ import annotations

import logging as py_logging
import os
import sys
import tempfile
import threading
import traceback

from transformer_jax.errors import is_disk_full  # noqa: F401 (checkpoint.py and train.py ask here)

# asyncio: orbax writes through asyncio tasks, whose unretrieved failures asyncio itself logs (with the traceback).
_DIVERTED_LIBRARIES = ('orbax', 'tensorstore', 'asyncio')

SIGNALS_HELP = """Signals: SIGTERM or SIGINT (Ctrl-C) at any phase end the run with exit 0 and keep all committed work:
  while preparing data, restoring or compiling (before the first step): stop at once (nothing new to save);
  while training (steps, evaluations, saves): finish the current step, save a checkpoint, print
    'preempted: saved checkpoint at step N in DIR';
  during the final evaluation: wait for the final checkpoint (already being saved) to commit, print
    'preempted: ...', and stop (rerun to evaluate it: an already complete run only evaluates).
  Either way a rerun resumes from the newest committed checkpoint. kill -9 is safe too (saves are atomic)."""

_lock = threading.Lock()
_detail_file = None


def detail_log_path() -> str:
  return os.path.join(tempfile.gettempdir(), f'transformer_jax.{os.getpid()}.log')


def _detail_stream():
  global _detail_file
  with _lock:
    if _detail_file is None:
      _detail_file = open(detail_log_path(), 'a', encoding='utf-8')
    return _detail_file


def log_detail(text: str) -> str:
  """Appends text to the detail log; returns the log's path."""
  try:
    stream = _detail_stream()
    stream.write(text.rstrip('\n') + '\n')
    stream.flush()
  except OSError:
    pass
  return detail_log_path()


def send_stderr_to_detail_log() -> None:
  """From now on this process's stderr (fd 2, so C++ and thread output too) goes to the detail log."""
  try:
    sys.stderr.flush()
    fd = os.open(detail_log_path(), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
  except OSError:
    pass


def log_exception(e: BaseException, what: str) -> str:
  return log_detail(f'{what}\n' + ''.join(traceback.format_exception(type(e), e, e.__traceback__)))


class _DivertLibraryErrors(py_logging.Filter):
  """Drops orbax/tensorstore (and asyncio) ERROR records, tracebacks included, from the terminal; writes them to the
  detail log."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    path = (record.pathname or '').replace('\\', '/')
    if record.levelno >= py_logging.ERROR and any(f'/{lib}/' in path for lib in _DIVERTED_LIBRARIES):
      try:
        text = record.getMessage()
      except Exception:
        text = str(record.msg)
      if record.exc_info:
        text += '\n' + ''.join(traceback.format_exception(*record.exc_info))
      log_detail(f'{record.levelname} {record.pathname}:{record.lineno} {text}')
      return False
    return True


# Libraries whose warnings are about their own plumbing (orbax: "Given directory is read only" on every reader; gcsfs
# and google-auth: how credentials were found), not about the user's run: shown only with -v / --verbosity.
_QUIET_LIBRARIES = ('orbax', 'gcsfs', 'fsspec', 'google/auth', 'google/cloud', 'etils')


class _QuietLibraryWarnings(py_logging.Filter):
  """Drops the records below ERROR that those libraries log (through absl or the logging module)."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    path = (record.pathname or '').replace('\\', '/')
    return record.levelno >= py_logging.ERROR or not any(f'/{lib}/' in path for lib in _QUIET_LIBRARIES)


def quiet_library_warnings(verbose: bool) -> None:
  """Unless verbose: the _QUIET_LIBRARIES' log warnings and Python warnings are not shown (idempotent)."""
  if verbose:
    return
  import warnings
  from absl import logging

  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraryWarnings) for f in handler.filters):
    handler.addFilter(_QuietLibraryWarnings())
  for handler in py_logging.getLogger().handlers:  # the logging module's own handlers, where one is installed
    if not any(isinstance(f, _QuietLibraryWarnings) for f in handler.filters):
      handler.addFilter(_QuietLibraryWarnings())
  pattern = '|'.join(lib.replace('/', r'\.') for lib in _QUIET_LIBRARIES)
  warnings.filterwarnings('ignore', module=rf'({pattern})(\.|$)')


def divert_library_errors() -> None:
  """Installs the filter on absl's handler (idempotent)."""
  from absl import logging

  handler = logging.get_absl_handler()
  if not any(isinstance(f, _DivertLibraryErrors) for f in handler.filters):
    handler.addFilter(_DivertLibraryErrors())
  default_hook = threading.excepthook

  def thread_excepthook(args):  # orbax's writer threads after a failed save: details to the log
    if '/orbax/' in ''.join(traceback.format_tb(args.exc_traceback)) or isinstance(args.exc_value, RuntimeError):
      log_detail(
        f'exception in thread {getattr(args.thread, "name", "?")}\n'
        + ''.join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
      )
      return
    default_hook(args)

  if getattr(threading.excepthook, '__name__', '') != 'thread_excepthook':
    threading.excepthook = thread_excepthook

  # After a failed save orbax closes its writer thread's event loop while tensorstore still holds callbacks for the
  # other in-flight writes; each then fails in `call_soon_threadsafe` and is printed from C++ through sys.excepthook
  # (or sys.unraisablehook), at any moment, before or after the error line. Those go to the log; the rest as usual.
  default_excepthook, default_unraisablehook = sys.excepthook, sys.unraisablehook

  def excepthook(exc_type, exc_value, exc_traceback):
    if _is_closed_loop_callback(exc_value, exc_traceback):
      log_detail(
        'callback on a closed event loop\n' + ''.join(traceback.format_exception(exc_type, exc_value, exc_traceback))
      )
      return
    default_excepthook(exc_type, exc_value, exc_traceback)

  def unraisablehook(unraisable):
    if _is_closed_loop_callback(unraisable.exc_value, unraisable.exc_traceback):
      log_detail(
        'callback on a closed event loop (unraisable)\n'
        + ''.join(traceback.format_exception(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback))
      )
      return
    default_unraisablehook(unraisable)

  if not getattr(sys.excepthook, 'transformer_jax', False):
    excepthook.transformer_jax = unraisablehook.transformer_jax = True
    sys.excepthook, sys.unraisablehook = excepthook, unraisablehook


def _is_closed_loop_callback(exc_value, exc_traceback) -> bool:
  """asyncio's 'Event loop is closed' raised from `call_soon_threadsafe` (a library callback after the loop ended)."""
  if not isinstance(exc_value, RuntimeError) or 'Event loop is closed' not in str(exc_value):
    return False
  return any(frame.name in ('call_soon_threadsafe', '_check_closed') for frame in traceback.extract_tb(exc_traceback))


def free_bytes(directory: str) -> int | None:
  """Free bytes on the file system of directory (or its nearest existing parent); None for URLs."""
  import shutil

  if '://' in directory:
    return None
  probe = os.path.abspath(directory)
  while not os.path.exists(probe) and os.path.dirname(probe) != probe:
    probe = os.path.dirname(probe)
  try:
    return shutil.disk_usage(probe).free
  except OSError:
    return None


def human_bytes(n: int) -> str:
  for unit, size in (('GB', 1 << 30), ('MB', 1 << 20), ('KB', 1 << 10)):
    if n >= size:
      return f'{n / size:.1f} {unit}'
  return f'{n} bytes'
