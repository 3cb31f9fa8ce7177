"""One writer per workdir: `train`, `import` and `average --out` hold an exclusive lock on the directory they write.

Two trainers saving into one checkpoints/ directory delete each other's steps, and with two configs a resume would
mix them, so a second writer must be refused at once, naming the first. Readers (evaluate, translate, export) take
no lock: checkpoints are committed by an atomic rename, so reading while training runs is safe.

POSIX (PosixLock): an advisory fcntl.flock on WORKDIR/.lock, held for the life of the process. The kernel drops a
flock when its holder dies, kill -9 included, so a stale lock never blocks a restart; the file's content (host, pid,
start time, command) only names the holder in the refusal. A clean release deletes the file (while still holding
the lock; a taker re-checks that the file it locked is still the one at the path), so a finished or refused run
leaves the workdir as it found it.

Object stores (ObjectStoreLock, over the small ObjectStore interface): no process-lifetime locks there, so the lock
is an object holding the holder and a heartbeat time, created only if absent and rewritten only if unchanged since
we wrote it (generation preconditions, as GCS offers). The holder rewrites it every `heartbeat_s`; a lock whose
heartbeat is older than `timeout_s` belongs to a dead holder and is taken over (with a warning). A holder that finds
its lock taken over stops at its next check (`check()`), before it writes again. gs:// workdirs use GCSStore
(google-cloud-storage generation preconditions: `if_generation_match=0` creates only if absent).

Multi-host runs: process 0 alone takes the lock (every process writes the same workdir as one writer).
"""

from __future__ import annotations

import abc
import json
import os
import socket
import sys
import threading
import time

from transformer_jax import errors
from transformer_jax.storage import layout as layout_lib

LOCK_NAME = layout_lib.LOCK_NAME
DEFAULT_TIMEOUT_S = 300.0  # object stores: a heartbeat older than this marks a dead holder
DEFAULT_HEARTBEAT_S = 30.0


class WorkdirLockedError(errors.UserError, RuntimeError):
  """Another writer holds the workdir (the message names it)."""

  exit_code = errors.FAILED  # nothing given is wrong: the same command works once the holder ends


def holder_info(command: str) -> dict:
  return {
    'host': socket.gethostname(),
    'pid': os.getpid(),
    'started': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
    'command': command[:300],
  }


def describe_holder(info: dict | None) -> str:
  if not info:
    return 'another process (it has not recorded itself yet)'
  return f'pid {info.get("pid")} on host {info.get("host")}, started {info.get("started")}' + (
    f' ({info.get("command")})' if info.get('command') else ''
  )


def _refusal(workdir: str, info: dict | None, extra: str = '') -> WorkdirLockedError:
  return WorkdirLockedError(
    f'{workdir} is in use by another writer: {describe_holder(info)}{extra}; wait for it to '
    'finish or stop it (a stopped or killed process releases the lock), or use another '
    '--workdir'
  )


def _parse(data: bytes) -> dict | None:
  try:
    info = json.loads(data.decode('utf-8'))
    return info if isinstance(info, dict) else None
  except (ValueError, UnicodeDecodeError):
    return None


class WorkdirLock(abc.ABC):
  """acquire() (raises WorkdirLockedError naming the holder), check() (raises if the lock was lost), release()."""

  def __init__(self, workdir: str, command: str = ''):
    self.workdir = workdir
    self.info = holder_info(command)

  @abc.abstractmethod
  def acquire(self) -> None: ...

  @abc.abstractmethod
  def release(self) -> None: ...

  def check(self) -> None:
    """Raises WorkdirLockedError if the lock is no longer ours (object stores: taken over after a missed heartbeat)."""

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()


class NoLock(WorkdirLock):
  """Processes other than 0 of a multi-host run, and workdirs no lock is implemented for."""

  def acquire(self) -> None:
    pass

  def release(self) -> None:
    pass


class PosixLock(WorkdirLock):
  """fcntl.flock(LOCK_EX | LOCK_NB) on WORKDIR/.lock, held until release() or the process's end."""

  def __init__(self, workdir: str, command: str = ''):
    super().__init__(workdir, command)
    self.path = layout_lib.WorkdirLayout(workdir).lock  # the path as given: the lock resolves nothing
    self._fd: int | None = None
    self._created_dir = False

  def acquire(self) -> None:
    import fcntl  # (POSIX only)

    if self._fd is not None:
      return
    if not os.path.isdir(self.workdir):
      os.makedirs(self.workdir)
      self._created_dir = True
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        info = self._read_holder(fd)
        os.close(fd)
        self._remove_created_dir()
        raise _refusal(self.workdir, info) from None
      try:  # the holder we waited on may have deleted the file between our open and flock: lock the new one
        same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    self._fd = fd
    data = json.dumps(self.info).encode('utf-8')
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, data, 0)
    except OSError:  # e.g. a full disk: the flock alone is the lock; only the name in a refusal is lost
      pass

  @staticmethod
  def _read_holder(fd: int) -> dict | None:
    for _ in range(20):  # the holder writes its name right after it locks: give it a moment
      info = _parse(os.pread(fd, 4096, 0))
      if info:
        return info
      time.sleep(0.05)
    return None

  def holder(self) -> dict | None:
    """The recorded holder of the lock file (None if no file or no record); does not lock."""
    try:
      with open(self.path, 'rb') as f:
        return _parse(f.read(4096))
    except OSError:
      return None

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      os.unlink(self.path)  # while still locked: nobody can be holding it meanwhile
    except OSError:
      pass
    os.close(self._fd)
    self._fd = None
    self._remove_created_dir()

  def _remove_created_dir(self) -> None:
    if self._created_dir:
      try:
        os.rmdir(self.workdir)  # only if still empty: a refused or failed first run leaves no directory behind
      except OSError:
        pass
      self._created_dir = False


# ---------------------------------------------------------------------------------------------------------------------
# Object stores


class ObjectStore(abc.ABC):
  """The little an object-store lock needs: reads with a generation, writes and deletes with preconditions."""

  @abc.abstractmethod
  def read(self, name: str) -> tuple[bytes, int] | None:
    """(content, generation) or None when absent."""

  @abc.abstractmethod
  def write(self, name: str, data: bytes, *, if_generation: int) -> int | None:
    """Writes if the object's generation is `if_generation` (0: only if absent); the new generation, else None."""

  @abc.abstractmethod
  def delete(self, name: str, *, if_generation: int) -> bool:
    """Deletes if the object's generation is `if_generation`."""


class MemoryStore(ObjectStore):
  """An in-process ObjectStore (tests; the semantics a GCS adapter must keep)."""

  def __init__(self):
    self._objects: dict[str, tuple[bytes, int]] = {}
    self._next = 1
    self._mutex = threading.Lock()

  def read(self, name):
    with self._mutex:
      return self._objects.get(name)

  def write(self, name, data, *, if_generation):
    with self._mutex:
      current = self._objects.get(name, (b'', 0))[1]
      if current != if_generation:
        return None
      self._objects[name] = (bytes(data), self._next)
      self._next += 1
      return self._next - 1

  def delete(self, name, *, if_generation):
    with self._mutex:
      if self._objects.get(name, (b'', 0))[1] != if_generation or name not in self._objects:
        return False
      del self._objects[name]
      return True


class GCSStore(ObjectStore):
  """ObjectStore over a GCS bucket: names are gs:// URIs; writes and deletes carry if_generation_match."""

  def __init__(self, timeout_s: float = 30.0):
    from transformer_jax.storage import paths

    self._client = paths._storage_client()
    self._timeout = timeout_s

  def _blob(self, name: str):
    bucket, _, key = name[len('gs://') :].partition('/')
    return self._client.bucket(bucket).blob(key)

  def read(self, name):
    from google.api_core import exceptions

    blob = self._blob(name)
    try:
      data = blob.download_as_bytes(timeout=self._timeout)  # also fills blob.generation (of the bytes read)
    except exceptions.NotFound:
      return None
    return data, int(blob.generation)

  def write(self, name, data, *, if_generation):
    from google.api_core import exceptions

    blob = self._blob(name)
    try:
      blob.upload_from_string(bytes(data), if_generation_match=int(if_generation), timeout=self._timeout)
    except exceptions.PreconditionFailed:
      return None
    return int(blob.generation)

  def delete(self, name, *, if_generation):
    from google.api_core import exceptions

    current = self.read(name)  # GCS checks the precondition itself; this also covers servers that ignore it on
    if current is None or current[1] != int(if_generation):  # deletes (fake-gcs-server does)
      return False
    try:
      self._blob(name).delete(if_generation_match=int(if_generation), timeout=self._timeout)
    except (exceptions.PreconditionFailed, exceptions.NotFound):
      return False
    return True


def _dead_here(info: dict) -> bool:
  """The holder ran on this host and its pid is gone (killed, crashed): its lock can be taken at once."""
  if info.get('host') != socket.gethostname() or not isinstance(info.get('pid'), int):
    return False
  try:
    os.kill(info['pid'], 0)
  except ProcessLookupError:
    return True
  except OSError:
    return False
  return False


class ObjectStoreLock(WorkdirLock):
  """A lock object WORKDIR/.lock with the holder and a heartbeat; taken over once the heartbeat is `timeout_s` old."""

  def __init__(
    self,
    workdir: str,
    command: str = '',
    *,
    store: ObjectStore,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    heartbeat_s: float = DEFAULT_HEARTBEAT_S,
    clock=time.time,
  ):
    super().__init__(workdir, command)
    if not 0 < heartbeat_s < timeout_s:
      raise ValueError(f'need 0 < heartbeat_s < timeout_s, got {heartbeat_s} and {timeout_s}')
    self.name = layout_lib.WorkdirLayout(workdir.rstrip('/')).lock
    self.store, self.timeout_s, self.heartbeat_s, self._clock = store, timeout_s, heartbeat_s, clock
    self._generation: int | None = None
    self._lost: str | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _payload(self) -> bytes:
    return json.dumps(dict(self.info, heartbeat=self._clock(), timeout_s=self.timeout_s)).encode('utf-8')

  def acquire(self, *, start_heartbeat: bool = True) -> None:
    current = self.store.read(self.name)
    if current is None:
      generation = self.store.write(self.name, self._payload(), if_generation=0)
    else:
      data, seen = current
      info = _parse(data) or {}
      age = self._clock() - float(info.get('heartbeat', 0.0))
      if age < self.timeout_s and not _dead_here(info):
        raise _refusal(
          self.workdir, info, f', last heartbeat {age:.0f} s ago (taken over after {self.timeout_s:.0f} s without one)'
        )
      generation = self.store.write(self.name, self._payload(), if_generation=seen)
      if generation is not None:
        why = (
          'its process is gone from this host'
          if age < self.timeout_s
          else f'no heartbeat for {age:.0f} s (timeout {self.timeout_s:.0f} s)'
        )
        print(
          f'warning: took over the lock of {self.workdir} from {describe_holder(info)}: {why}',
          file=sys.stderr,
          flush=True,
        )
    if generation is None:  # someone else wrote it between our read and write
      current = self.store.read(self.name)
      raise _refusal(self.workdir, _parse(current[0]) if current else None)
    self._generation, self._lost = generation, None
    if start_heartbeat:
      self._stop.clear()
      self._thread = threading.Thread(target=self._beat, name='workdir-lock-heartbeat', daemon=True)
      self._thread.start()

  def heartbeat(self) -> bool:
    """Rewrites the heartbeat if the object is still ours; False (and check() raises from then on) if it is not."""
    if self._generation is None or self._lost:
      return False
    generation = self.store.write(self.name, self._payload(), if_generation=self._generation)
    if generation is None:
      current = self.store.read(self.name)
      self._lost = describe_holder(_parse(current[0]) if current else None)
      return False
    self._generation = generation
    return True

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      if not self.heartbeat():
        return

  def check(self) -> None:
    if self._lost:
      raise WorkdirLockedError(
        f'lost the lock of {self.workdir} to {self._lost} (no heartbeat for '
        f'{self.timeout_s:.0f} s); stopping before writing again'
      )

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    if self._generation is not None and not self._lost:
      self.store.delete(self.name, if_generation=self._generation)
    self._generation = None


def lock_workdir(workdir: str, command: str = '', *, process_index: int = 0) -> WorkdirLock:
  """The writer's lock for workdir, not yet acquired (use it as a context manager); process 0 alone locks."""
  if process_index != 0:
    lock: WorkdirLock = NoLock(workdir, command)
  elif workdir.startswith('gs://'):
    timeout_s = float(os.environ.get('TRANSFORMER_JAX_LOCK_TIMEOUT_S', DEFAULT_TIMEOUT_S))
    lock = ObjectStoreLock(
      workdir.rstrip('/'),
      command,
      store=GCSStore(),
      timeout_s=timeout_s,
      heartbeat_s=min(DEFAULT_HEARTBEAT_S, timeout_s / 4),
    )
  elif '://' in workdir:  # refused earlier by the path checks; never silently unlocked
    raise ValueError(f'no workdir lock for {workdir}: only local paths and gs:// are supported')
  else:
    lock = PosixLock(workdir, command)
  return lock
