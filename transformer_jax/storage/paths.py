"""Every path the project reads or writes: a local path or a gs://bucket/path URI, through one small layer.

Local paths stay plain `os`/`open` (fast, unchanged semantics: temp file + rename for whole-file writes). gs:// goes
through `etils.epath` (what Orbax itself uses for its non-array files; with EPATH_USE_TF=false it uses gcsfs, which
honours STORAGE_EMULATOR_HOST, so the tests reach a local fake-gcs-server). Object-store rules this layer keeps:
  - no append: GCS has none (gcsfs silently turns 'a' into 'w'), so callers write whole objects or numbered chunks;
  - a whole-object write is one upload, which GCS makes visible atomically (readers see the old or the new object);
  - no rename of directories is relied on (Orbax marks a finished step with commit_success.txt on gs://).
Anything else (s3://, hdfs://, ...) is refused up front: `check` gives the one line the CLI prints.
"""

from __future__ import annotations

import os
import re
import time

from transformer_jax import errors

SUPPORTED = 'local paths and gs://bucket/path'
_SCHEME = re.compile(r'^([A-Za-z][A-Za-z0-9+.-]*)://')
PROBE_TIMEOUT_S = 20.0


class UnsupportedPathError(errors.UserError, ValueError):
  """A URI of a scheme this project cannot read or write."""


class BucketError(errors.UserError, ValueError):
  """A gs:// bucket that does not exist, cannot be reached or cannot be written (one line)."""


def is_gcs(path: str | None) -> bool:
  return bool(path) and str(path).startswith('gs://')


def check(path: str | None, flag: str = 'path') -> str | None:
  """Why `path` is not supported (one line, no 'error:' prefix), or None."""
  if not path:
    return None
  m = _SCHEME.match(str(path))
  if m and m.group(1) != 'gs':
    return f'{flag}={path}: {m.group(1)}:// is not supported; supported: {SUPPORTED}'
  if m and not bucket_of(path):
    return f'{flag}={path}: no bucket name; supported: {SUPPORTED}'
  return None


def resolve(path: str) -> str:
  """gs:// URIs as given (without a trailing slash); local paths made absolute. Other schemes: UnsupportedPathError."""
  problem = check(path)
  if problem:
    raise UnsupportedPathError(problem)
  if is_gcs(path):
    return str(path).rstrip('/') if str(path).rstrip('/') != 'gs:/' else str(path)
  return os.path.abspath(path)


def bucket_of(path: str) -> str:
  return str(path)[len('gs://') :].split('/', 1)[0] if is_gcs(path) else ''


def join(path: str, *parts: str) -> str:
  return os.path.join(path, *parts)  # works on 'gs://bucket/x' strings too (no normalisation of the '//')


def _invalidate_listings() -> None:
  """Our writes go through google-cloud-storage; gcsfs (under epath, under Orbax) caches directory listings per
  process, so after a change it must forget them (else Orbax sees a moved step as still there)."""
  import sys

  if 'gcsfs' in sys.modules:
    import fsspec

    for kwargs in ({}, {'finalize_on_close': True}):  # the latter is epath's instance
      fsspec.filesystem('gs', **kwargs).invalidate_cache()


def _epath(path: str):
  from etils import epath

  return epath.Path(path)


def exists(path: str) -> bool:
  return _epath(path).exists() if is_gcs(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _epath(path).is_dir() if is_gcs(path) else os.path.isdir(path)


def listdir(path: str) -> list[str]:
  """Names in a directory ([] when it does not exist)."""
  if is_gcs(path):
    p = _epath(path)
    return sorted(c.name for c in p.iterdir()) if p.exists() else []
  return sorted(os.listdir(path)) if os.path.isdir(path) else []


def makedirs(path: str) -> None:
  if is_gcs(path):
    return  # object stores have no directories: a prefix exists once an object is under it
  os.makedirs(path, exist_ok=True)


def read_bytes(path: str) -> bytes:
  if is_gcs(path):
    from google.api_core import exceptions

    try:
      return _blob(path).download_as_bytes(timeout=120)
    except exceptions.NotFound:
      raise FileNotFoundError(f'no object {path}') from None
  with open(path, 'rb') as f:
    return f.read()


def read_text(path: str) -> str:
  return read_bytes(path).decode('utf-8', errors='replace')


def write_bytes_atomic(path: str, data: bytes) -> None:
  """The whole of `data` at `path`, never a part: local temp file + fsync + rename; gs:// one upload."""
  if is_gcs(path):
    _blob(path).upload_from_string(bytes(data), timeout=120)  # one request (resumable above 8 MB): all or nothing
    _invalidate_listings()
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  write_local_atomic(path, lambda f: f.write(data))


def write_local_atomic(path: str, write) -> None:
  """A local file written whole or not at all: `write(f)` into a temp file beside it, fsync, rename (streams large
  files such as the token-id shards without holding them as bytes)."""
  tmp = f'{path}.tmp-{os.getpid()}-{time.time_ns()}'
  try:
    with open(tmp, 'wb') as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text_atomic(path: str, text: str) -> None:
  write_bytes_atomic(path, text.encode('utf-8'))


def copy_file(source: str, target: str) -> None:
  write_bytes_atomic(target, read_bytes(source))


def upload_file(local: str, target: str) -> None:
  """A local file copied whole to `target` (local or gs://)."""
  with open(local, 'rb') as f:
    write_bytes_atomic(target, f.read())


def remove(path: str) -> None:
  if is_gcs(path):
    _epath(path).unlink(missing_ok=True)
    _invalidate_listings()
  elif os.path.exists(path):
    os.remove(path)


def _blobs_under(path: str) -> list:
  """The objects under gs://bucket/prefix/ (one listing request per page; no glob)."""
  client = _blob(path).client
  bucket, _, prefix = str(path)[len('gs://') :].partition('/')
  return list(client.list_blobs(bucket, prefix=prefix.rstrip('/') + '/'))


def rmtree(path: str) -> None:
  if is_gcs(path):
    for blob in _blobs_under(path):
      blob.delete(timeout=120)
    _invalidate_listings()
    return
  import shutil

  shutil.rmtree(path, ignore_errors=True)


def copytree(source: str, target: str) -> None:
  """Every file under `source` copied to `target` (either may be gs://); objects written whole."""
  if is_gcs(source):
    prefix = len(str(source)[len('gs://') :].partition('/')[2].rstrip('/')) + 1
    for blob in _blobs_under(source):
      relative = blob.name[prefix:]
      if is_gcs(target):  # a server-side copy: the bytes never travel here
        target_blob = _blob(join(target, relative))
        blob.bucket.copy_blob(blob, target_blob.bucket, target_blob.name, timeout=120)
      else:
        write_bytes_atomic(join(target, relative), blob.download_as_bytes(timeout=120))
    return
  for dirpath, _, files in os.walk(source):
    for name in files:
      full = os.path.join(dirpath, name)
      upload_file(full, join(target, os.path.relpath(full, source)))


def move_tree(source: str, target: str) -> None:
  """A directory moved (gs://: copied object by object, then deleted: GCS has no directory rename)."""
  if is_gcs(source) or is_gcs(target):
    copytree(source, target)
    rmtree(source)
    return
  import shutil

  shutil.move(source, target)


# ---------------------------------------------------------------------------------------------------------------------
# Buckets: fail with one line before any work


def cache_root() -> str:
  """The local cache for what must be on a local disk (memory-mapped shards, downloaded text and models)."""
  base = os.environ.get('TRANSFORMER_JAX_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'transformer_jax')
  return base


def local_copy(path: str) -> str:
  """A local file or directory for `path`: itself when local; for gs:// a copy in the cache, downloaded once per
  object version (the key holds each object's generation, so a changed object is fetched again). Readers that need
  a file (line counting by block reads, SentencePiece, transformers' loaders) use it; nothing is written back."""
  if not is_gcs(path):
    return path
  import hashlib

  blob = _blob(path)
  from google.api_core import exceptions

  try:
    blob.reload(timeout=60)
    objects = [(blob.name, blob)]  # a single object
    prefix = None
  except exceptions.NotFound:
    prefix = blob.name.rstrip('/') + '/'
    objects = [(b.name, b) for b in blob.client.list_blobs(blob.bucket, prefix=prefix, timeout=60)]
    if not objects:
      raise FileNotFoundError(f'no object or folder {path}') from None
  key = hashlib.sha256(repr(sorted((name, b.generation, b.size) for name, b in objects)).encode()).hexdigest()[:16]
  root = os.path.join(cache_root(), 'downloads', f'{bucket_of(path)}-{key}')
  local = os.path.join(root, os.path.basename(blob.name.rstrip('/')))
  if os.path.exists(os.path.join(root, '.complete')):
    return local
  os.makedirs(root, exist_ok=True)
  for name, b in objects:
    target = local if prefix is None else os.path.join(local, name[len(prefix) :])
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f'{target}.tmp-{os.getpid()}'
    b.download_to_filename(tmp, timeout=600)
    os.replace(tmp, target)
  open(os.path.join(root, '.complete'), 'w').close()  # only a whole copy is reused
  return local


_CLIENT = None


def _blob(path: str):
  """google-cloud-storage Blob of a gs:// URI (whole-object reads and writes go through it, not gcsfs: one request
  each, and the same client the bucket checks and the lock use)."""
  global _CLIENT
  if _CLIENT is None:
    _CLIENT = _storage_client()
  bucket, _, name = str(path)[len('gs://') :].partition('/')
  return _CLIENT.bucket(bucket).blob(name)


def _storage_client():
  from google.cloud import storage
  from google.auth import credentials as auth_credentials

  if os.environ.get('STORAGE_EMULATOR_HOST'):  # a local server (tests): no credentials to find
    return storage.Client(
      project=os.environ.get('GOOGLE_CLOUD_PROJECT', 'test'), credentials=auth_credentials.AnonymousCredentials()
    )
  return storage.Client()


def check_bucket(path: str, *, writable: bool = False, timeout_s: float = PROBE_TIMEOUT_S) -> None:
  """Raises BucketError (one line) when path's bucket does not exist or cannot be reached, or (writable) when a small
  probe object cannot be written and deleted there. A no-op for local paths. Called before any data is loaded: a
  missing bucket otherwise surfaces minutes later (or hangs a mkdir) deep inside Orbax."""
  if not is_gcs(path):
    return
  bucket_name = bucket_of(path)
  try:
    client = _storage_client()
    bucket = client.lookup_bucket(bucket_name, timeout=timeout_s)
  except Exception as e:  # (auth, DNS, HTTP: all mean "cannot use it")
    raise BucketError(
      f'cannot reach bucket gs://{bucket_name} for {path} ({_reason(e)}); check the name, your '
      'credentials (gcloud auth application-default login) and the network'
    ) from None
  if bucket is None:
    raise BucketError(
      f'bucket gs://{bucket_name} does not exist (for {path}); create it (gcloud storage buckets '
      f'create gs://{bucket_name}) or use another path'
    )
  if not writable:
    return
  name = f'{path[len("gs://") + len(bucket_name) :].strip("/")}/.write-probe-{os.getpid()}-{time.time_ns()}'.lstrip('/')
  try:
    blob = bucket.blob(name)
    blob.upload_from_string(b'probe', timeout=timeout_s)
    blob.delete(timeout=timeout_s)
  except Exception as e:
    raise BucketError(
      f'cannot write to {path} ({_reason(e)}); it needs write access (roles/storage.objectAdmin on '
      f'gs://{bucket_name}) or use another path'
    ) from None


def _reason(e: BaseException) -> str:
  first = str(e).splitlines()[0] if str(e) else ''
  return f'{type(e).__name__}: {first}'[:200]
