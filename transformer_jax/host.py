"""What this machine has (a TPU or not), told to jax and libtpu before they initialise.

Where the [tpu] extra installs libtpu on a machine without a TPU, jax lets libtpu probe for one at its first use, and
libtpu prints half a dozen lines of errors (no accelerator type, no worker hostnames) before every command's output.
The CLI picks the CPU first (choose_platform); `compile`, which loads libtpu for a topology, tells it this host is no
TPU host (libtpu_host_env). Nothing here imports jax.
"""

from __future__ import annotations

import glob
import importlib.util
import os

# What says this machine has a TPU: its device files, or the variables a TPU VM (or a user) sets for libtpu.
_TPU_DEVICE_FILES = ('/dev/accel*', '/dev/vfio/*')
_TPU_ENV = ('TPU_ACCELERATOR_TYPE', 'TPU_WORKER_HOSTNAMES', 'TPU_WORKER_ID', 'TPU_NAME', 'JAX_FORCE_TPU_INIT')
# A Google PCI device (jax's own TPU detection reads the same files) other than a network or storage one (gVNIC on
# every GCE VM): a TPU generation not known yet counts as a TPU, since mistaking a TPU for none would leave it idle.
_GOOGLE_PCI_VENDOR = '0x1ae0'
_NOT_ACCELERATOR_CLASSES = ('0x01', '0x02')  # PCI classes: mass storage, network
_GPU_PLUGINS = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm6_plugin', 'jax_rocm7_plugin')


def tpu_present() -> bool:
  if any(glob.glob(pattern) for pattern in _TPU_DEVICE_FILES) or any(os.environ.get(v) for v in _TPU_ENV):
    return True
  for device in glob.glob('/sys/bus/pci/devices/*'):
    try:
      with open(os.path.join(device, 'vendor'), encoding='ascii') as f:
        if f.read().strip() != _GOOGLE_PCI_VENDOR:
          continue
      with open(os.path.join(device, 'class'), encoding='ascii') as f:
        if not f.read().strip().startswith(_NOT_ACCELERATOR_CLASSES):
          return True
    except OSError:
      continue
  return False


def choose_platform() -> str | None:
  """Sets JAX_PLATFORMS=cpu, before jax initialises, where libtpu is installed but there is no TPU and no GPU plugin
  (`compile` uses libtpu's topology API, which needs no local TPU). A JAX_PLATFORMS the user set is kept. Returns
  what it set."""
  if os.environ.get('JAX_PLATFORMS') or tpu_present() or importlib.util.find_spec('libtpu') is None:
    return None
  if any(importlib.util.find_spec(plugin) is not None for plugin in _GPU_PLUGINS):
    return None  # a GPU host with libtpu installed too: leave the choice to jax
  os.environ['JAX_PLATFORMS'] = 'cpu'
  return 'cpu'


_ACCELERATOR_NAMES = {'v5e': 'v5litepod'}  # libtpu's accelerator-type name where it differs from the chip's


def libtpu_host_env(chip_name: str, cores: int) -> dict[str, str]:
  """The variables a TPU VM sets for libtpu, for a host without a TPU that compiles for `cores` TensorCores of
  `chip_name` chips: without them libtpu prints five lines of errors as it loads. They describe the local host, not
  the topology compiled for (the compiled programs and their figures are the same with and without them)."""
  if tpu_present():
    return {}
  return {
    'TPU_WORKER_HOSTNAMES': 'localhost',
    'TPU_ACCELERATOR_TYPE': f'{_ACCELERATOR_NAMES.get(chip_name, chip_name)}-{cores}',
  }
