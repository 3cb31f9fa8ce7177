"""Tests run on CPU with 8 simulated devices (multi-device code paths without a GPU or TPU).

Every `transformer-jax` subprocess a test starts inherits this environment, including one persistent JAX
compilation cache for the whole session (and for every pytest-xdist worker): the many small end-to-end runs share a
handful of programs, so only the first run of each compiles it. The cache is keyed by program, flags and jax version,
and lives in .pytest_cache (git-ignored). The in-process tests use it too: many of them build the same small steps
again (a new jit of the same program misses JAX's in-memory cache), so they share it too (benchmarks/RESULTS.md has
the figures).
"""

import os
import sys

# The suite starts ~100 Python processes (CLI runs, workers), each importing ~1,800 modules of jax, flax, orbax and
# TensorFlow. With PYTHONDONTWRITEBYTECODE set (the machines here set it) and an installer that writes no
# .pyc files (uv), every one of them would compile all that source again, a large share of a small `train` run's
# CPU. The tests write the bytecode once, into the venv and the
# checkout's git-ignored __pycache__ directories, and every later process reads it.
os.environ.pop('PYTHONDONTWRITEBYTECODE', None)
sys.dont_write_bytecode = False

# The tests' programs are tiny and mostly run a few times, so compiling them costs far more than running them:
# backend optimization level 0 (no LLVM optimization passes) and the legacy fusion emitters compile a cold small
# `train` run with well under half the CPU of the default flags. The same programs, but float results can differ in
# their last bits from the default flags' (configs/tiny.py's initial parameters do), so tests compare runs made under
# the same flags or with tolerances. The test that runs 100 real steps (test_train's learning-rate test) runs its
# subprocess with the default flags.
os.environ.setdefault(
  'XLA_FLAGS',
  '--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false',
)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
# `train` subprocesses keep glibc's per-thread arenas: the tests' runs are a few compile-bound steps, where one heap
# (hugepages.py, for long runs) costs more than it saves.
os.environ.setdefault('TRANSFORMER_JAX_ONE_HEAP', '0')

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault(
  'JAX_COMPILATION_CACHE_DIR', os.path.join(_REPO, '.pytest_cache', 'd', 'transformer_jax_compilation_cache')
)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import jax  # noqa: E402,F401  (reads the JAX_* variables above)


# `--dist loadfile` hands each worker whole files in collection order, which is alphabetical: a long file late in
# the alphabet (test_train.py) would run alone at the end. The longest files go first (longest-processing-time
# scheduling); the rest keep their order.
_LONGEST_FIRST = (
  'test_train.py',
  'test_checkpoint.py',
  'test_multiprocess.py',
  'test_gcs.py',
  'test_reliability.py',
  'test_performance.py',
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: tests within a file keep their order


import pytest  # noqa: E402

import helpers  # noqa: E402


@pytest.fixture(scope='session')
def env():
  """The CLI subprocesses' environment: conftest's (8 CPU devices, the session's JAX compilation cache, so only the
  first run compiles a program), with this checkout first on the path."""
  return helpers.cli_env()
