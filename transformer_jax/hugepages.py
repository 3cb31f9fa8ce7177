"""Transparent huge pages for XLA's CPU buffers: glibc's `glibc.malloc.hugetlb=1`, set by re-executing once.

XLA:CPU allocates each step's temporary buffers (hundreds of MB on the default model) with malloc, and glibc serves
blocks that large with a fresh mmap that it unmaps when the step ends: every step faults in ~100k new 4 KiB pages,
and on the default job about a third of the CPU time went to the kernel (issue 15; `perf record -e page-faults`
puts them in XLA's matmul kernels writing their outputs). With the tunable, malloc advises those mappings as
transparent huge pages (2 MiB): 15x fewer page faults on the default job. glibc reads tunables only when a process
starts, so the CLI (and the benchmarks) re-execute themselves once, the same process id, with the tunable set.
Off with TRANSFORMER_JAX_HUGEPAGES=0; nothing happens off Linux/glibc, or where THP is 'never' or already 'always'.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = 'glibc.malloc.hugetlb=1'
_THP = '/sys/kernel/mm/transparent_hugepage/enabled'


def wanted() -> bool:
  """Whether this process would gain from the tunable and does not have it yet."""
  if sys.platform != 'linux' or os.environ.get('TRANSFORMER_JAX_HUGEPAGES', '1') == '0':
    return False
  if 'glibc.malloc.hugetlb' in os.environ.get('GLIBC_TUNABLES', ''):
    return False
  libc, version = platform.libc_ver()
  if libc != 'glibc' or tuple(int(p) for p in version.split('.')[:2] if p.isdigit()) < (2, 35):
    return False  # the tunable appeared in glibc 2.35
  try:
    with open(_THP, encoding='ascii') as f:
      return '[madvise]' in f.read()  # 'always': every mapping is huge already; 'never': nothing to gain
  except OSError:
    return False


def environ() -> dict[str, str]:
  """os.environ with the tunable added (other GLIBC_TUNABLES kept)."""
  tunables = os.environ.get('GLIBC_TUNABLES', '')
  return dict(os.environ, GLIBC_TUNABLES=f'{tunables}:{TUNABLE}' if tunables else TUNABLE)


def child_environ() -> dict[str, str]:
  """The environment for a child process: with the tunable where this machine would use it (benchmarks start their
  workers with it, so both systems they compare run on the same allocator settings)."""
  return environ() if wanted() else dict(os.environ)


def reexec_if_wanted() -> None:
  """Replaces this process by itself (same argv, same pid) with the tunable set; returns if not wanted or failed.

  Call it first thing in a program's entry point, before anything slow is imported or any thread is started."""
  if not wanted():
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ())
  except OSError:
    pass  # carry on without huge pages
