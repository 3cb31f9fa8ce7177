"""glibc malloc settings for XLA's CPU buffers, set by re-executing once (glibc reads tunables only at start-up).

XLA:CPU allocates each step's temporary buffers (hundreds of MB on the default model) with malloc, and glibc serves
blocks that large with a fresh mmap that it unmaps when the step ends: every step faults in ~100k new 4 KiB pages,
and on the default job a large share of the CPU time goes to the kernel (`perf record -e page-faults` puts them in
XLA's matmul kernels writing their outputs; benchmarks/RESULTS.md has the figures). Two remedies, both tunables:
- huge pages (every command): `glibc.malloc.hugetlb=1` advises those mappings as transparent huge pages (2 MiB):
  far fewer faults, but each step still maps fresh memory that the kernel must zero (`clear_page_erms` stays high in
  a training run's CPU samples with it);
- one heap (`train`, and the training benchmark): `arena_max=1`, `mmap_max=0` and a `trim_threshold` above any
  run's memory serve every block from one heap that is never handed back, so step N reuses step N-1's pages: no
  page faults in the steady state. It costs short runs
  that mostly compile (XLA's compiler threads contend for the one arena), so tests turn it off with
  TRANSFORMER_JAX_ONE_HEAP=0, and it keeps a run's peak memory resident until the run ends.
The CLI and the benchmarks re-execute themselves once, the same process id, with the tunables added to any existing
GLIBC_TUNABLES. Everything off with TRANSFORMER_JAX_HUGEPAGES=0; nothing happens off Linux or before glibc 2.35, and
huge pages are left alone where THP is 'never' or already 'always'.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = 'glibc.malloc.hugetlb=1'
ONE_HEAP = ('glibc.malloc.arena_max=1', 'glibc.malloc.mmap_max=0', 'glibc.malloc.trim_threshold=1099511627776')
_THP = '/sys/kernel/mm/transparent_hugepage/enabled'


def _glibc_with_tunables() -> bool:
  if sys.platform != 'linux' or os.environ.get('TRANSFORMER_JAX_HUGEPAGES', '1') == '0':
    return False
  libc, version = platform.libc_ver()
  return libc == 'glibc' and tuple(int(p) for p in version.split('.')[:2] if p.isdigit()) >= (2, 35)  # hugetlb: 2.35


def _thp_madvise() -> bool:
  try:
    with open(_THP, encoding='ascii') as f:
      return '[madvise]' in f.read()  # 'always': every mapping is huge already; 'never': nothing to gain
  except OSError:
    return False


def tunables(one_heap: bool = False) -> list[str]:
  """The tunables this process should run with on this machine."""
  if not _glibc_with_tunables():
    return []
  wanted = [TUNABLE] if _thp_madvise() else []
  if one_heap and os.environ.get('TRANSFORMER_JAX_ONE_HEAP', '1') != '0':
    wanted += ONE_HEAP
  return wanted


def _present() -> list[str]:
  return [t for t in os.environ.get('GLIBC_TUNABLES', '').split(':') if t]


def _missing(one_heap: bool) -> list[str]:
  present = {t.split('=')[0] for t in _present()}
  return [t for t in tunables(one_heap) if t.split('=')[0] not in present]


def wanted(one_heap: bool = False) -> bool:
  """Whether this process would gain from a tunable it does not have yet."""
  return bool(_missing(one_heap))


def environ(one_heap: bool = False) -> dict[str, str]:
  """os.environ with the missing tunables added (other GLIBC_TUNABLES kept)."""
  return dict(os.environ, GLIBC_TUNABLES=':'.join(_present() + _missing(one_heap)))


def child_environ(one_heap: bool = False) -> dict[str, str]:
  """The environment for a child process, with the tunables this machine would use (benchmarks start their workers
  with it, so both systems they compare run on the same allocator settings)."""
  return environ(one_heap) if wanted(one_heap) else dict(os.environ)


def reexec_if_wanted(one_heap: bool = False) -> None:
  """Replaces this process by itself (same argv, same pid) with the tunables set; returns if not wanted or failed.

  Call it first thing in a program's entry point, before anything slow is imported or any thread is started."""
  if not wanted(one_heap):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ(one_heap))
  except OSError:
    pass  # carry on with glibc's defaults
