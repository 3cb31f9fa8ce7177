"""The errors a user meets: one line and an exit status, no traceback.

Every refusal or failure the project explains to its user is a UserError (the project's error classes subclass it
beside the builtin they specialise, so `except ValueError` still catches a ValueError subclass). commands.run prints
`error: <first line>` and exits with the error's exit_code. Library errors the user can act on (a full disk, a
read-only target, the builtin ValueError/FileNotFoundError the library code raises with a one-line message) become a
UserError in `from_library_error`, the one place that looks at a library exception's type.

Imports nothing of the project, so that any layer can raise these without an import cycle.
"""

from __future__ import annotations

import errno

# Exit statuses: 2, refused: something given (the command line, the config, the files named) needs changing; 1, the
# command could not do its work (a busy workdir, a failed save, a diverging loss, a full disk).
REFUSED = 2
FAILED = 1


class UserError(Exception):
  """A one-line message for the user (the first line of str(self); later lines are detail for logs)."""

  exit_code = REFUSED
  # Set where a failed library call's background threads report again while the interpreter shuts down: the CLI
  # sends stderr to the detail log once the error line is out.
  quiet_shutdown = False

  @property
  def line(self) -> str:
    text = str(self)
    return text.splitlines()[0] if text.strip() else type(self).__name__


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXT = ('no space left on device', 'disk quota exceeded', "os_error_code='28'", "os_error_code='122'")
_UNWRITABLE = {errno.EACCES: 'permission denied', errno.EROFS: 'read-only file system'}
# The builtins the project's modules raise with a one-line message for the user.
_MESSAGE_ERRORS = (ValueError, FileNotFoundError, NotImplementedError)


def is_disk_full(e: BaseException | None) -> bool:
  """An OSError ENOSPC/EDQUOT anywhere in the exception's chain, or tensorstore's text for one."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
      return True
    if any(t in str(e).lower() for t in DISK_FULL_TEXT):
      return True
    e = e.__cause__ or e.__context__
  return False


def from_library_error(e: BaseException) -> UserError | None:
  """The UserError a library exception means to the user, or None for a bug (its traceback is the report)."""
  if isinstance(e, UserError):
    return e
  if isinstance(e, _MESSAGE_ERRORS):
    return _failed(str(e).splitlines()[0] if str(e).strip() else type(e).__name__)
  if isinstance(e, OSError) and e.errno in _UNWRITABLE:  # a target this user cannot write
    return _failed(
      f'cannot write {e.filename or "the workdir"}: {e.strerror} ({_UNWRITABLE[e.errno]}); '
      'use a writable --workdir / --out'
    )
  if isinstance(e, OSError) and is_disk_full(e):
    return _failed(
      f'no space left on device writing {e.filename or "the workdir"} ({e.strerror}); free space and rerun '
      '(training resumes from the newest checkpoint)'
    )
  return None


def _failed(message: str) -> UserError:
  error = UserError(message)
  error.exit_code = FAILED
  return error
