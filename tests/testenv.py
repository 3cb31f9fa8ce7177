"""Environment for the tests' subprocesses."""

import os
import re

_COUNT = re.compile(r'--xla_force_host_platform_device_count=\d+')


def xla_flags(device_count: int) -> str:
  """conftest's XLA_FLAGS (its fast-compiling flags included) with `device_count` simulated CPU devices.

  A subprocess given only the device count would compile with XLA's full optimization: several times the compile
  time of these few-step programs, and results that differ in the last bits from the in-process runs'.
  """
  flag = f'--xla_force_host_platform_device_count={device_count}'
  flags = os.environ.get('XLA_FLAGS', '')
  return _COUNT.sub(flag, flags) if _COUNT.search(flags) else f'{flags} {flag}'.strip()
