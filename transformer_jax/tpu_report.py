"""What a compiled TPU program shows: collectives read from its HLO text (kind, bytes, mesh axes), per-chip memory
by kind, and the report lines / JSON of `transformer-jax compile`. No jax import: text and numbers only."""

from __future__ import annotations

import collections
import dataclasses
import math
import re

import numpy as np

from transformer_jax import tpu_chips

KINDS = ('all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all', 'collective-permute')
_OP = re.compile(r'^\s+(?:ROOT\s+)?%\S+\s*=\s*(.*?)\s(all-gather|all-reduce|reduce-scatter|all-to-all|'
                 r'collective-permute)(-start)?\(')
_ARRAY = re.compile(r'\b(pred|[suf]\d+|bf16|f8e\w+|c64|c128)\[([0-9,]*)\]')
_BITS = {'pred': 8, 'bf16': 16, 'c64': 64, 'c128': 128}
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\](T\(([0-9,]*)\))?\s*\{([^}]*)\}")
_IOTA_GROUPS = re.compile(r'replica_groups=\[(\d+),(\d+)\]<=\[([0-9,]+)\](T\(([0-9,]*)\))?')
_LIST_GROUPS = re.compile(r'replica_groups=\{((?:\{[0-9,]*\},?)*)\}')
_PAIRS = re.compile(r'source_target_pairs=\{((?:\{[0-9,]*\},?)*)\}')


def _array_bytes(dtype: str, dims: str) -> int:
  bits = _BITS.get(dtype) or int(re.sub(r'\D', '', dtype.split('e')[0]) or 8)
  return math.prod(int(d) for d in dims.split(',') if d) * bits // 8


def _groups(line: str, num_devices: int) -> list[list[int]]:
  """Device (partition) ids of each replica group of a collective; [] when the line names none (= all)."""
  m = _MESH_GROUPS.search(line)
  if m:  # mesh['axis_0'=4,'axis_1'=2] {'axis_0'}: ids laid out row-major over these dims; groups span the named
    names = re.findall(r"'(\w+)'=(\d+)", m.group(1))
    ids = np.arange(num_devices).reshape([int(n) for _, n in names])
    if m.group(3):
      ids = ids.transpose([int(p) for p in m.group(3).split(',')])
      names = [names[int(p)] for p in m.group(3).split(',')]
    order = [n for n, _ in names]
    over = [order.index(a) for a in re.findall(r"'(\w+)'", m.group(4))]
    rest = [i for i in range(len(order)) if i not in over]
    return ids.transpose(rest + over).reshape(-1, math.prod(ids.shape[i] for i in over) if over else 1).tolist()
  m = _IOTA_GROUPS.search(line)
  if m:  # [G,S]<=[dims]T(perm): iota over dims, transposed, reshaped to G groups of S
    ids = np.arange(math.prod(int(d) for d in m.group(3).split(','))).reshape([int(d) for d in m.group(3).split(',')])
    if m.group(5):
      ids = ids.transpose([int(p) for p in m.group(5).split(',')])
    return ids.reshape(int(m.group(1)), int(m.group(2))).tolist()
  m = _PAIRS.search(line) or _LIST_GROUPS.search(line)
  if m:
    return [[int(x) for x in g.split(',') if x] for g in re.findall(r'\{([0-9,]*)\}', m.group(1))]
  return []


def mesh_axes_of(groups: list[list[int]], mesh_shape: tuple[int, ...], axis_names: tuple[str, ...]) -> tuple[str, ...]:
  """The mesh axes along which the devices of a group differ (device id = row-major index into the mesh)."""
  if not groups:
    return tuple(n for n, s in zip(axis_names, mesh_shape) if s > 1)
  varying = set()
  for group in groups:
    coords = np.array(np.unravel_index(np.array(group), mesh_shape)).T
    varying |= {axis_names[i] for i in range(len(mesh_shape)) if len(set(coords[:, i])) > 1}
  return tuple(n for n in axis_names if n in varying)


@dataclasses.dataclass
class Collective:
  kind: str
  bytes: int  # the largest array of its result (the gathered / reduced / exchanged data)
  group_size: int
  axes: tuple[str, ...]
  crosses_slices: bool
  fused_reduce_scatter: bool = False

  def ici_bytes(self) -> float:
    """Bytes one chip sends, ring algorithm: (n-1)/n of the data (all-reduce: twice; reduce-scatter: of its
    full-size input; collective-permute: all of it). An estimate."""
    n = max(self.group_size, 1)
    share = (n - 1) / n
    if self.kind == 'all-reduce':
      return 2 * share * self.bytes
    if self.kind == 'reduce-scatter':
      return share * (self.bytes if self.fused_reduce_scatter else self.bytes * n)
    if self.kind == 'collective-permute':
      return float(self.bytes)
    return share * self.bytes


_MEGASCALE = re.compile(r'=\s*\((.*?)\)\s+send\(.*_xla_megascale_transfer_type="(\w+)"')


def collectives(hlo_text: str, mesh_shape: tuple[int, ...], axis_names: tuple[str, ...],
                num_slices: int = 1) -> list[Collective]:
  """Every collective instruction in the HLO (async *-start counted, *-done not; one inside a while loop counts
  once). TPU fuses the gradient reduction into `all-reduce-scatter` computations: an all-reduce there is reported
  as the reduce-scatter it is.

  Over several slices the program is one slice's: replica groups number the devices of a slice (the mesh's first
  axis, data, split by num_slices), and what crosses slices (DCN, over data) is a megascale `send` whose transfer
  type names the collective.
  """
  local_shape = (mesh_shape[0] // num_slices,) + tuple(mesh_shape[1:])
  num_devices = math.prod(local_shape)
  found, computation = [], ''
  for line in hlo_text.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith('{'):
      computation = line.split()[1] if line.startswith('ENTRY') else line.split()[0]
      continue
    dcn = _MEGASCALE.search(line) if num_slices > 1 and ' send(' in line else None
    if dcn:
      arrays = [_array_bytes(t, d) for t, d in _ARRAY.findall(dcn.group(1))]
      found.append(Collective(dcn.group(2).lower().replace('_', '-'), max(arrays, default=0), num_slices,
                              (axis_names[0],), True))
      continue
    m = _OP.match(line)
    if not m:
      continue
    kind = m.group(2)
    fused = kind == 'all-reduce' and computation.lstrip('%').startswith('all-reduce-scatter')
    kind = 'reduce-scatter' if fused else kind
    arrays = [_array_bytes(t, d) for t, d in _ARRAY.findall(m.group(1))]
    # a tuple result is several arrays reduced at once (sum), except async starts that carry (input, output)
    summed = m.group(1).startswith('(') and (not m.group(3) or m.group(2) == 'all-reduce')
    size = sum(arrays) if summed else max(arrays, default=0)
    groups = _groups(line, num_devices)
    found.append(Collective(kind, size, len(groups[0]) if groups else num_devices,
                            mesh_axes_of(groups, local_shape, axis_names), False, fused))
  return found


def summarize(found: list[Collective]) -> dict:
  """{kind: {count, bytes, ici_bytes, dcn_bytes, by_axes: {'fsdp': count, ...}, crossing_slices: count}}."""
  out = {}
  for kind in KINDS:
    ops = [c for c in found if c.kind == kind]
    if not ops:
      continue
    by_axes = collections.Counter('+'.join(c.axes) or 'none' for c in ops)
    out[kind] = {'count': len(ops), 'bytes': sum(c.bytes for c in ops),
                 # ICI within a slice; what crosses slices goes over DCN (not in the roofline's ICI term)
                 'ici_bytes': sum(c.ici_bytes() for c in ops if not c.crosses_slices),
                 'dcn_bytes': sum(c.bytes for c in ops if c.crosses_slices), 'by_axes': dict(sorted(by_axes.items())),
                 'crossing_slices': sum(c.crosses_slices for c in ops)}
  return out


@dataclasses.dataclass
class ProgramReport:
  """Figures of one compiled program, per chip. Every time, rate and MFU here is an ESTIMATE (tpu_chips.roofline)."""
  program: str
  topology: str
  chips: int
  num_slices: int
  mesh: dict
  chip: str
  compile_s: float
  # bytes per chip: state and batch (their shards' logical sizes), other_args (argument bytes beyond those: TPU's
  # tiled layouts pad minor dimensions to tiles of 128, and the PRNG key), temporaries, outputs, total, hbm
  memory: dict
  fits: bool
  flops_per_chip: float
  bytes_accessed_per_chip: float
  collectives: dict
  model_flops: float
  tokens_per_step: int
  estimate: dict  # roofline(...) + tokens_per_s + mfu
  notes: list = dataclasses.field(default_factory=list)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def _gib(n: float) -> str:
  return f'{n / tpu_chips.GIB:.2f} GiB' if abs(n) >= 0.1 * tpu_chips.GIB else f'{n / 2**20:.2f} MiB'


def format_report(r: ProgramReport) -> list[str]:
  m = r.memory
  mesh = ' '.join(f'{k}={v}' for k, v in r.mesh.items())
  e = r.estimate
  lines = [f'{r.program} on {r.topology} ({r.chips} chips {r.chip}, mesh {mesh}): compiled in {r.compile_s:.1f} s',
           f"  HBM per chip: params+optimizer {_gib(m['state'])}, batch {_gib(m['batch'])}, tiled-layout padding + "
           f"other args {_gib(m['other_args'])}, temporaries {_gib(m['temporaries'])}, outputs "
           f"{_gib(m['outputs'])}; total {_gib(m['total'])} of {_gib(m['hbm'])}: {'fits' if r.fits else 'DOES NOT FIT'}",
           f'  XLA per chip per step: {r.flops_per_chip / 1e12:.3f} TFLOP, {_gib(r.bytes_accessed_per_chip)} accessed']
  if r.collectives:
    lines.append('  collectives (static count in the HLO; bytes = largest result array, summed):')
    for kind, s in r.collectives.items():
      axes = ', '.join(f'{a}: {n}' for a, n in s['by_axes'].items())
      cross = f", {s['crossing_slices']} of them across slices (DCN)" if s['crossing_slices'] else ''
      lines.append(f"    {kind}: {s['count']} ops, {_gib(s['bytes'])} (over {axes}){cross}")
  else:
    lines.append('  collectives: none')
  times = (f"compute {e['t_compute_s'] * 1e3:.2f} ms, HBM {e['t_hbm_s'] * 1e3:.2f} ms, ICI {e['t_ici_s'] * 1e3:.2f} "
           f"ms -> {e['t_step_s'] * 1e3:.2f} ms ({e['bound_by']}-bound)")
  if r.tokens_per_step:
    lines.append(f"  ESTIMATE (roofline, perfect overlap: optimistic): {times}, {e['tokens_per_s']:,.0f} target "
                 f"tokens/s, MFU {e['mfu'] * 100:.1f}% ({r.model_flops / 1e12:.2f} model TFLOP per step)")
  else:
    lines.append(f'  roofline of the counted work: {times}; no tokens/s or MFU for a decoding loop')
  lines.extend(f'  note: {n}' for n in r.notes)
  return lines
