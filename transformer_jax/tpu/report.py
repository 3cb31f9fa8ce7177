"""What a compiled TPU program shows: its logical collectives read from the HLO text (kind, bytes, mesh axes, runs
per step), an ESTIMATE of its HBM traffic from the same text (hbm_traffic), per-chip memory by kind, and the report
lines / JSON of `transformer-jax compile`. No jax import: text and numbers only."""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import re

import numpy as np

from transformer_jax.tpu import chips as tpu_chips

KINDS = ('all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all', 'collective-permute')
_OP = re.compile(
  r'^\s+(?:ROOT\s+)?%\S+\s*=\s*(.*?)\s(all-gather|all-reduce|reduce-scatter|all-to-all|'
  r'collective-permute)(-start)?\('
)
_ARRAY = re.compile(r'\b(pred|[suf]\d+|bf16|f8e\w+|c64|c128)\[([0-9,]*)\]')
_BITS = {'pred': 8, 'bf16': 16, 'c64': 64, 'c128': 128}
_MESH_GROUPS = re.compile(r'replica_groups=mesh\[([^\]]*)\](T\(([0-9,]*)\))?\s*\{([^}]*)\}')
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
  channel_id: int | None = None
  executions: int = 1  # runs per step: a collective inside a while loop runs trip-count times

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
_CHANNEL = re.compile(r'channel_id=(\d+)')


# ---------------------------------------------------------------------------------------------------------------------
# The HLO text as computations of instructions, and how often each computation runs per step


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str  # the result shape text, layouts included (a tuple is '(a, b, ...)')
  op: str
  operands: list  # names ('%x') of the operand instructions
  attrs: str  # everything after the operand list
  line: str


_HEADER = re.compile(r'^(ENTRY\s+)?(%[\w.\-]+)\s.*\{\s*$')
_INSTRUCTION = re.compile(r'^\s+(?:ROOT\s+)?(%[\w.\-]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\((.*)$')


def _split_call(rest: str) -> tuple[str, str]:
  """'a, b), attr=...' -> ('a, b', 'attr=...'): the operand list up to its matching parenthesis."""
  depth = 1
  for i, ch in enumerate(rest):
    depth += (ch == '(') - (ch == ')')
    if depth == 0:
      return rest[:i], rest[i + 1 :].lstrip(', ')
  return rest, ''


def parse_hlo(hlo_text: str) -> tuple[dict[str, list[Instruction]], str]:
  """({computation name: its instructions}, the ENTRY computation's name) of an HLO module's text."""
  computations, entry, current = {}, '', None
  for line in hlo_text.splitlines():
    if not line:
      continue
    if not line[0].isspace():
      m = _HEADER.match(line)
      if m:
        current = computations.setdefault(m.group(2), [])
        entry = m.group(2) if m.group(1) else entry
      elif line.startswith('}') and not line.startswith('}}'):
        current = None
      # else: the rest of a multi-line attribute (a Pallas kernel's config holds newlines): same computation
      continue
    m = _INSTRUCTION.match(line) if current is not None else None
    if m:
      operands, attrs = _split_call(m.group(4))
      current.append(Instruction(m.group(1), m.group(2), m.group(3), re.findall(r'%[\w.\-]+', operands), attrs, line))
  return computations, entry


_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def trip_count(while_op: Instruction, computations: dict[str, list[Instruction]]) -> int | None:
  """Iterations of a while loop: XLA's known_trip_count when the backend config has one; else a condition whose
  ROOT is `compare(counter, constant N), direction=LT` (XLA's windowed-einsum and scan loops, counting from 0)
  gives N. None when neither says (the caller counts the body once and says so)."""
  m = _TRIP.search(while_op.attrs)
  if m:
    return int(m.group(1))
  cond = re.search(r'condition=(%[\w.\-]+)', while_op.attrs)
  body = computations.get(cond.group(1), []) if cond else []
  root = next((i for i in body if i.line.lstrip().startswith('ROOT ')), None)
  if root is None or root.op != 'compare' or 'direction=LT' not in root.attrs:
    return None
  constants = {i.name: i for i in body if i.op == 'constant'}
  for name in root.operands[1:]:
    c = re.search(r'constant\((\d+)\)', constants[name].line) if name in constants else None
    if c:
      return int(c.group(1))
  return None


@dataclasses.dataclass
class CallGraph:
  """How many times each computation runs per step (`runs`), and which ones run as sequences of top-level
  instructions (`control`: ENTRY, while bodies and conditions, called and branch computations; the rest are fusion
  bodies and reducers, whose instructions run inside their caller's). A loop body runs trip-count times its
  caller; a computation reached from several places takes its most-run caller's count. `unknown_trips`: while
  loops whose trip count could not be read (their bodies count once)."""

  runs: dict
  control: set
  unknown_trips: int


def call_graph(computations: dict[str, list[Instruction]], entry: str) -> CallGraph:
  runs, control, unknown = {entry: 1}, {entry}, set()
  todo = [entry]
  while todo:
    name = todo.pop()
    for instr in computations.get(name, []):
      callees = []  # (computation, times per run of the caller, runs as top-level instructions)
      if instr.op == 'while':
        n = trip_count(instr, computations)
        if n is None:
          unknown.add(instr.name)
        for key in ('body', 'condition'):
          m = re.search(key + r'=(%[\w.\-]+)', instr.attrs)
          if m:
            callees.append((m.group(1), n or 1, True))
      elif instr.op in ('call', 'conditional', 'async-start'):
        for m in re.finditer(r'(?:to_apply|calls|true_computation|false_computation)=(%[\w.\-]+)', instr.attrs):
          callees.append((m.group(1), 1, name in control))
        for m in re.finditer(r'branch_computations=\{([^}]*)\}', instr.attrs):
          callees.extend((c, 1, name in control) for c in re.findall(r'%[\w.\-]+', m.group(1)))
      else:
        callees.extend((c, 1, False) for c in re.findall(r'(?:to_apply|calls)=(%[\w.\-]+)', instr.attrs))
      for callee, times, is_control in callees:
        if callee not in computations:
          continue
        grew = runs.get(callee, 0) < runs[name] * times
        if is_control and callee not in control:
          control.add(callee)
          grew = True
        if grew:
          runs[callee] = max(runs.get(callee, 0), runs[name] * times)
          todo.append(callee)
  return CallGraph(runs, control, len(unknown))


# ---------------------------------------------------------------------------------------------------------------------
# Collectives


def collective_of(
  instr: Instruction, computation: str, local_shape: tuple[int, ...], axis_names: tuple[str, ...], num_slices: int = 1
) -> Collective | None:
  """The collective an HLO line starts or runs (None if it is not one): kind, result bytes, group and mesh axes.
  `local_shape`: one slice's mesh shape (replica groups number a slice's devices)."""
  line = instr.line
  dcn = _MEGASCALE.search(line) if num_slices > 1 and instr.op == 'send' else None
  if dcn:
    arrays = [_array_bytes(t, d) for t, d in _ARRAY.findall(dcn.group(1))]
    return Collective(
      dcn.group(2).lower().replace('_', '-'), max(arrays, default=0), num_slices, (axis_names[0],), True
    )
  m = _OP.match(line)
  if not m:
    return None
  kind = m.group(2)
  fused = kind == 'all-reduce' and computation.lstrip('%').startswith('all-reduce-scatter')
  kind = 'reduce-scatter' if fused else kind
  arrays = [_array_bytes(t, d) for t, d in _ARRAY.findall(m.group(1))]
  # a tuple result is several arrays reduced at once (sum), except async starts that carry (input, output)
  summed = m.group(1).startswith('(') and (not m.group(3) or m.group(2) == 'all-reduce')
  size = sum(arrays) if summed else max(arrays, default=0)
  groups = _groups(line, math.prod(local_shape))
  return Collective(
    kind,
    size,
    len(groups[0]) if groups else math.prod(local_shape),
    mesh_axes_of(groups, local_shape, axis_names),
    False,
    fused,
  )


def collectives(
  hlo_text: str, mesh_shape: tuple[int, ...], axis_names: tuple[str, ...], num_slices: int = 1
) -> list[Collective]:
  """The logical collectives of the HLO: one per channel_id. TPU's async collective fusion starts a collective in
  one fusion and advances it in several later ones, each repeating the `all-gather(...)` line with the same
  channel_id, so counting lines overcounts (base's 797 all-gather lines are 195 collectives). Async *-start ops
  count, *-done not. A collective inside a while loop (the collective-permute rings of XLA's windowed einsum, which
  fuse a weight gradient's reduce-scatter with its matmul) is one logical collective that runs trip-count times:
  `executions`, which the ICI bytes multiply. TPU fuses the gradient reduction into `all-reduce-scatter`
  computations: an all-reduce there is reported as the reduce-scatter it is.

  Over several slices the program is one slice's: replica groups number the devices of a slice (the mesh's first
  axis, data, split by num_slices), and what crosses slices (DCN, over data) is a megascale `send` whose transfer
  type names the collective.
  """
  local_shape = (mesh_shape[0] // num_slices,) + tuple(mesh_shape[1:])
  computations, entry = parse_hlo(hlo_text)
  runs = call_graph(computations, entry).runs if entry else {}
  found: dict = {}
  for computation, instructions in computations.items():
    for instr in instructions:
      collective = collective_of(instr, computation, local_shape, axis_names, num_slices)
      if collective is None:
        continue
      ch = _CHANNEL.search(instr.attrs)
      key = (collective.kind, collective.crosses_slices, ch.group(1) if ch else f'{computation}/{instr.name}')
      collective.channel_id = int(ch.group(1)) if ch else None
      collective.executions = max(runs.get(computation, 1), found[key].executions if key in found else 1)
      found[key] = collective
  return list(found.values())


# ---------------------------------------------------------------------------------------------------------------------
# HBM traffic


_LAYOUT_ARRAY = re.compile(r'\b(pred|[suf]\d+|bf16|f8e\w+|c64|c128)\[([0-9,]*)\](\{[^}]*\})?')
_MEMORY_SPACE = re.compile(r'S\((\d+)\)')
# No data moved (views, bookkeeping), or moved by the instruction that is counted instead (the *-start of an async
# pair; a loop's or call's instructions, counted in its body).
_FREE = frozenset(
  (
    'parameter',
    'get-tuple-element',
    'tuple',
    'bitcast',
    'constant',
    'after-all',
    'partition-id',
    'replica-id',
    'while',
    'call',
    'conditional',
    'opt-barrier',
    'add-dependency',
    'copy-done',
    'slice-done',
    'all-gather-done',
    'all-reduce-done',
    'collective-permute-done',
    'async-done',
    'async-update',
    'send-done',
    'recv-done',
  )
)


def _padded_bytes(dtype: str, dims: str, layout: str) -> int:
  """An array's bytes in its tiled layout: `{1,0:T(8,128)(2,1)}` stores the most-minor dimension (the layout's
  first) in multiples of 128 and the next one in multiples of 8 (the first tile; sub-tiles like (2,1) pack
  narrow types within it and are ignored)."""
  shape = [int(d) for d in dims.split(',') if d]
  m = re.match(r'\{([0-9,]*):T\(([0-9,]+)\)', layout or '')
  if m and shape:
    order = [int(d) for d in m.group(1).split(',') if d]
    tile = [int(t) for t in m.group(2).split(',')]
    for dim, size in zip(order, reversed(tile)):
      shape[dim] = -(-shape[dim] // size) * size
  return _array_bytes(dtype, ','.join(map(str, shape)))


def hbm_arrays_bytes(shape: str, skip: int = 0) -> int:
  """Bytes of the arrays of a shape text that live in HBM: layouts without a memory space, or S(0). S(1) is the
  alternate memory (VMEM on TPU); S(2), S(4), S(6) hold semaphores, scalars and flags. Sizes include the tiled
  layout's padding. `skip`: leave out the first arrays of a tuple (an async start's aliased inputs)."""
  total = 0
  for i, (dtype, dims, layout) in enumerate(_LAYOUT_ARRAY.findall(shape)):
    space = _MEMORY_SPACE.search(layout or '')
    if i >= skip and (space is None or space.group(1) == '0'):
      total += _padded_bytes(dtype, dims, layout)
  return total


def _arrays(shape: str) -> list[str]:
  return [m.group(0) for m in _LAYOUT_ARRAY.finditer(shape)]


def _as_hbm(shape: str) -> int:
  return hbm_arrays_bytes(_MEMORY_SPACE.sub('S(0)', shape))


def _sliced_hbm_bytes(instr: Instruction, shapes: dict[str, str], computations: dict) -> int | None:
  """HBM bytes of an instruction that touches only part of an HBM buffer, or None when it reads and writes whole
  arrays: an in-place dynamic-update-slice (a scan stacking a layer's output into a [layers, ...] buffer) writes
  the update, not the buffer; a dynamic-slice (a scan reading one layer's weights) reads the slice. Inside a
  fusion: a DUS root updating a parameter in place, and parameters read only through dynamic-slices."""
  if instr.op == 'dynamic-update-slice':
    update = shapes.get(instr.operands[1], '') if len(instr.operands) > 1 else ''
    return hbm_arrays_bytes(update) + (_as_hbm(update) if hbm_arrays_bytes(instr.shape) else 0)
  if instr.op == 'dynamic-slice':
    read = _as_hbm(instr.shape) if instr.operands and hbm_arrays_bytes(shapes.get(instr.operands[0], '')) else 0
    return read + hbm_arrays_bytes(instr.shape)
  callee = re.search(r'calls=(%[\w.\-]+)', instr.attrs)
  body = computations.get(callee.group(1), []) if callee else []
  params = {int(re.search(r'parameter\((\d+)\)', i.line).group(1)): i for i in body if i.op == 'parameter'}
  root = next((i for i in body if i.line.lstrip().startswith('ROOT ')), None)
  if root is None or not params:
    return None
  body_shapes = {i.name: i.shape for i in body}
  users = collections.defaultdict(list)
  for i in body:
    for position, o in enumerate(i.operands):
      users[o].append((i, position))
  in_place = None
  if root.op == 'dynamic-update-slice' and root.operands and root.operands[0] in {p.name for p in params.values()}:
    in_place = next(k for k, p in params.items() if p.name == root.operands[0])
  sliced = {
    k
    for k, p in params.items()
    if users[p.name] and all(u.op == 'dynamic-slice' and pos == 0 for u, pos in users[p.name])
  }
  if in_place is None and not sliced:
    return None
  total = 0
  if in_place is not None:
    update = body_shapes.get(root.operands[1], '') if len(root.operands) > 1 else ''
    total += _as_hbm(update) if hbm_arrays_bytes(instr.shape) else 0
  else:
    total += hbm_arrays_bytes(instr.shape)
  for k, operand in enumerate(instr.operands):
    if k == in_place or not hbm_arrays_bytes(shapes.get(operand, '')):
      continue
    if k in sliced:
      total += sum(_as_hbm(u.shape) for u, _ in users[params[k].name])
    else:
      total += hbm_arrays_bytes(shapes.get(operand, ''))
  return total


def instruction_hbm_bytes(instr: Instruction, shapes: dict[str, str], computations: dict | None = None) -> int:
  """HBM bytes one execution of a top-level instruction reads and writes (an estimate: a fusion that reads only a
  slice of an HBM operand is charged the whole operand).

  - default: its HBM-resident result plus its HBM-resident operands (a fusion's internals stay in vector registers
    and VMEM);
  - copy-start (async copy, memory-space assignment's prefetch HBM->VMEM or eviction VMEM->HBM): the destination
    (its result's first array) plus the source operand, HBM sides only: a prefetch or an eviction counts its data
    once, an HBM->HBM copy twice; copy-done moves nothing more;
  - slice-start (async slice into VMEM): the slice's bytes read when the source is in HBM, plus the destination
    when it is in HBM;
  - other async starts (collective-permute-start, all-gather-start): the result's first arrays alias the operands,
    so they are not counted again;
  - with `computations`: an in-place dynamic-update-slice writes its update and a dynamic-slice reads its slice,
    fused or not (_sliced_hbm_bytes): a scan over stacked layers touches one layer per iteration.
  """
  if computations is not None and instr.op in ('fusion', 'dynamic-update-slice', 'dynamic-slice'):
    sliced = _sliced_hbm_bytes(instr, shapes, computations)
    if sliced is not None:
      return sliced
  operands = sum(hbm_arrays_bytes(shapes.get(o, '')) for o in instr.operands)
  if instr.op == 'copy-start':
    arrays = _arrays(instr.shape)
    return hbm_arrays_bytes(arrays[0] if arrays else '') + operands
  if instr.op == 'slice-start':
    arrays = _arrays(instr.shape)  # ((source), destination, context)
    source_in_hbm = any(hbm_arrays_bytes(shapes.get(o, '')) for o in instr.operands)
    dest = arrays[1] if len(arrays) > 1 else ''
    slice_bytes = hbm_arrays_bytes(_MEMORY_SPACE.sub('S(0)', dest))
    return (slice_bytes if source_in_hbm else 0) + hbm_arrays_bytes(dest)
  if instr.op.endswith('-start') and instr.op != 'all-reduce-start':
    return hbm_arrays_bytes(instr.shape, skip=len(instr.operands)) + operands
  return hbm_arrays_bytes(instr.shape) + operands


def _group_name(instr: Instruction) -> str:
  m = re.search(r'op_name="([^"]*)"', instr.attrs)
  name = m.group(1) if m else instr.op
  name = re.sub(r'layers_\d+', 'layers_N', name)
  return re.sub(r'^jit\([\w.]+\)/|Transformer\.(en|de)code/', '', name)


@dataclasses.dataclass
class HbmTraffic:
  """ESTIMATED HBM bytes one chip moves per step (see hbm_traffic)."""

  bytes: float
  by_op_name: dict  # the largest groups: op_name (layer numbers folded into layers_N) -> bytes, largest first
  unknown_trip_counts: int  # while loops whose bodies were counted once for want of a trip count


def hbm_traffic(hlo_text: str, top: int = 12) -> HbmTraffic:
  """ESTIMATED HBM traffic of one run of a compiled TPU program, per chip, from its HLO after memory-space
  assignment.

  Why not XLA's `bytes accessed` (cost_analysis): it sums every operand and result of every instruction whatever
  memory it is in. On TPU, memory-space assignment keeps many activations and gathered weights in VMEM (layouts
  marked S(1)), and the async collective fusions count a gathered weight once per continuation fusion; for the
  paper configs that is several times the HBM traffic, and a roofline built on it is HBM-bound when the step is not.
  And it counts a while loop's body once (as does its FLOP count).

  The rules here: every top-level instruction (of ENTRY, and of while bodies, called and branch computations,
  times how often they run: while bodies times their trip count) is charged its HBM-resident operands and results
  (instruction_hbm_bytes: async copies and slices once, views and bookkeeping nothing). Fusion bodies are not
  walked: what a fusion keeps in registers and VMEM is not HBM traffic. It is an estimate both ways: a fusion
  reading a slice of an HBM operand is charged all of it (too high); VMEM bandwidth and latency are not counted at
  all, and whether the step's DMAs overlap its compute is not known from the text (the roofline assumes they do).
  """
  computations, entry = parse_hlo(hlo_text)
  graph = call_graph(computations, entry)
  groups = collections.Counter()
  for name in graph.control:
    instructions = computations[name]
    shapes = {i.name: i.shape for i in instructions}
    for instr in instructions:
      if instr.op in _FREE:
        continue
      groups[_group_name(instr)] += instruction_hbm_bytes(instr, shapes, computations) * graph.runs[name]
  return HbmTraffic(float(sum(groups.values())), {k: v for k, v in groups.most_common(top) if v}, graph.unknown_trips)


# ---------------------------------------------------------------------------------------------------------------------
# Per-operation roofline


_CONTRACTING = re.compile(r'lhs_contracting_dims=\{([0-9,]*)\}')
_DIM_LABELS = re.compile(r'dim_labels=(\w+)_(\w+)->(\w+)')
_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')


def _dims(shape: str) -> list[int]:
  m = _ARRAY.search(shape)
  return [int(d) for d in m.group(2).split(',') if d] if m else []


def dot_flops(instr: Instruction, shapes: dict[str, str]) -> float:
  """FLOPs of one dot or convolution: 2 x result elements x the multiply-adds behind each (a dot's contracting
  sizes; a convolution's kernel elements per output feature, dim_labels' 'o'); 0 for anything else."""
  if instr.op == 'dot':
    m = _CONTRACTING.search(instr.attrs)
    lhs = _dims(shapes.get(instr.operands[0], '')) if instr.operands else []
    k = math.prod(lhs[int(d)] for d in m.group(1).split(',') if d) if m and lhs else 1
    return 2.0 * math.prod(_dims(instr.shape)) * k
  if instr.op == 'convolution':
    m = _DIM_LABELS.search(instr.attrs)
    lhs = _dims(shapes.get(instr.operands[0], '')) if instr.operands else []
    rhs = _dims(shapes.get(instr.operands[1], '')) if len(instr.operands) > 1 else []
    out = _dims(instr.shape)
    if not m or not lhs or not rhs or 'o' not in m.group(2) or 'i' not in m.group(2) or 'b' not in m.group(3):
      return 0.0
    lhs_labels, rhs_labels, out_labels = m.groups()
    window = re.search(r'window=\{([^}]*)\}', instr.attrs)
    fields = dict(re.findall(r'(\w+)=(\S+)', window.group(1))) if window else {}
    taps = 1
    for d, label in enumerate(sorted(c for c in rhs_labels if c.isdigit())):
      pick = lambda key, default, d=d: fields[key].split('x')[d] if key in fields else default
      lo, hi = (int(x) for x in pick('pad', '0_0').split('_'))
      taps *= _valid_taps(
        lhs[lhs_labels.index(label)],
        rhs[rhs_labels.index(label)],
        out[out_labels.index(label)],
        lo,
        int(pick('stride', 1)),
        int(pick('lhs_dilate', 1)),
        int(pick('rhs_dilate', 1)),
      )
    return 2.0 * out[out_labels.index('b')] * rhs[rhs_labels.index('o')] * rhs[rhs_labels.index('i')] * taps
  return 0.0


@functools.cache
def _valid_taps(size: int, window: int, out: int, pad_lo: int, stride: int, lhs_dilate: int, rhs_dilate: int) -> int:
  """(output position, window position) pairs of one spatial dimension that land on input, not padding: XLA
  writes batched matmuls as convolutions whose window mostly covers padding (a head dimension of 32 as a window
  of 32 over one real position), and only the real taps are multiply-adds."""
  o = np.arange(out)[:, None] * stride + np.arange(window)[None, :] * rhs_dilate - pad_lo
  return int(np.sum((o >= 0) & (o <= (size - 1) * lhs_dilate) & (o % lhs_dilate == 0)))


def _body_flops(name: str, computations: dict, cache: dict) -> float:
  """Dot and convolution FLOPs of a fusion body, nested fusions included (one run)."""
  if name not in cache:
    cache[name] = 0.0
    instrs = computations.get(name, [])
    shapes = {i.name: i.shape for i in instrs}
    total = 0.0
    for i in instrs:
      total += dot_flops(i, shapes)
      for callee in re.findall(r'calls=(%[\w.\-]+)', i.attrs):
        total += _body_flops(callee, computations, cache)
    cache[name] = total
  return cache[name]


def _body_collective(name: str, computations: dict, local_shape, axis_names, num_slices, seen=None):
  """(the collective line's instruction, its computation) inside a fusion body, nested fusions included."""
  seen = seen if seen is not None else set()
  if name in seen:
    return None
  seen.add(name)
  for i in computations.get(name, []):
    if _OP.match(i.line):
      return i, name
    for callee in re.findall(r'calls=(%[\w.\-]+)', i.attrs):
      found = _body_collective(callee, computations, local_shape, axis_names, num_slices, seen)
      if found:
        return found
  return None


def torus_dims_spanned(group_size: int, torus: tuple[int, ...] | None) -> int:
  """How many torus dimensions a group of chips spans at least (its axis laid along the longest first): a group
  larger than the longest dimension reaches over a second one, and its collective uses that dimension's links too."""
  if not torus:
    return 1
  span, reach = 0, 1
  for size in sorted(torus, reverse=True):
    if reach >= group_size:
      break
    span, reach = span + 1, reach * size
  return max(span, 1)


def collective_seconds(c: Collective, chip, torus: tuple[int, ...] | None = None) -> float:
  """One execution of a collective on ICI: the bytes a chip sends over its links plus a latency per step.
  A ring collective sends both ways round its ring: two links per torus dimension its group spans, one direction
  each; a collective-permute sends to one neighbour (one link, one direction). Steps: n-1 for a ring (2(n-1) for
  an all-reduce, reduce-scatter then all-gather), 1 for a permute."""
  n = max(c.group_size, 1)
  if c.kind == 'collective-permute':
    return c.ici_bytes() / chip.link_bytes_per_s + tpu_chips.ICI_HOP_LATENCY_S
  steps = 2 * (n - 1) if c.kind == 'all-reduce' else n - 1
  links = 2 * torus_dims_spanned(n, torus)
  return c.ici_bytes() / (links * chip.link_bytes_per_s) + steps * tpu_chips.ICI_HOP_LATENCY_S


@dataclasses.dataclass
class PerOp:
  """ESTIMATED step time of one run of a compiled program, per chip, instruction by instruction (per_op_times)."""

  t_per_op_s: float  # the headline: sum of max(FLOPs/peak, HBM/bw) + collective time not hidden behind work
  t_floor_s: float  # no overlap at all: sum of FLOPs/peak + HBM/bw + collective time
  t_compute_s: float  # sum of FLOPs/peak (dots and convolutions, loops x trip counts)
  t_hbm_s: float
  t_ici_s: float  # all collective time
  t_ici_exposed_s: float  # what the per-op figure charges of it
  dot_flops: float  # executed dot/convolution FLOPs per chip
  top: list  # [(op_name, seconds)]: the largest per-op times, grouped by op_name (layers folded)
  executed: int  # top-level instructions executed per step (loops x trip counts; views and bookkeeping not)
  dcn_collectives: int  # collectives across slices: not in the ICI term
  cycles: float  # libtpu's "estimated_cycles", summed over executed instructions that carry one
  cycles_missing: int  # executed instructions without a cycle count
  cycles_missing_ops: dict  # their ops, by count


@dataclasses.dataclass
class _Tally:
  """per_op_times's running sums over the executed instructions of one program."""

  groups: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # op_name group -> seconds
  totals: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # compute, hbm, flops, ...
  missing: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # op -> runs with no cycles
  executed: int = 0
  dcn: int = 0


def per_op_times(
  hlo_text: str,
  chip,
  mesh_shape: tuple[int, ...],
  axis_names: tuple[str, ...],
  num_slices: int = 1,
  top: int = 10,
  torus: tuple[int, ...] | None = None,
) -> PerOp:
  """The per-operation roofline of a compiled TPU program, per chip: every executed top-level instruction (ENTRY,
  while bodies x trip count, called computations) takes max(dot FLOPs / bf16 peak, HBM bytes / HBM bandwidth).

  - FLOPs: dots and convolutions, read from the fusion bodies that hold them; element-wise work is left to the HBM
    term (the vector units are not modelled) and float32 dots are charged at the bf16 peak (optimistic for them).
  - HBM: instruction_hbm_bytes (HBM-resident operands and results; VMEM-resident ones free).
  - Collectives (collective_seconds, at one-way link bandwidth plus a hop latency; `torus`: the slice's chip grid,
    e.g. (4, 4), for the links a group spans): a synchronous one takes
    max(its HBM time, its ICI time); an asynchronous one (a *-start .. *-done pair, or TPU's async collective fusion:
    the fusions that carry one channel_id) is charged only what the work between its first and last instruction
    does not cover. Work between is credited to every collective in flight over it (optimistic when several are).
  The floor charges every term in full, one after another.
  Also sums libtpu's own per-instruction cost model ("estimated_cycles" in backend_config) over the same executed
  instructions, and counts those without one.
  """
  local_shape = (mesh_shape[0] // num_slices,) + tuple(mesh_shape[1:])
  computations, entry = parse_hlo(hlo_text)
  graph = call_graph(computations, entry)
  flops_cache: dict = {}
  tally = _Tally()
  for name in sorted(graph.control):
    runs = graph.runs[name]
    work, spans = _instruction_times(
      name, computations, runs, chip, local_shape, axis_names, num_slices, flops_cache, tally
    )
    _charge_collectives(spans, work, runs, chip, torus, tally)
  return _per_op_of(tally, top)


def _instruction_times(
  name: str,
  computations: dict,
  runs: int,
  chip,
  local_shape: tuple[int, ...],
  axis_names: tuple[str, ...],
  num_slices: int,
  flops_cache: dict,
  tally: _Tally,
) -> tuple[list[float], dict]:
  """One run's work, max(compute, HBM), of each instruction of control computation `name`, and its collectives'
  spans ({key: [first index, last index, Collective, group name]}); charges `runs` runs of each to `tally`."""
  instrs = computations[name]
  shapes = {i.name: i.shape for i in instrs}
  work = [0.0] * len(instrs)
  spans: dict = {}
  index = {i.name: k for k, i in enumerate(instrs)}
  for k, instr in enumerate(instrs):
    if instr.op in _FREE:
      if instr.op.endswith('-done') and instr.operands and instr.operands[0] in index:
        start = instr.operands[0]  # an op-level async pair: the span ends at its done
        if start in spans:
          spans[start][1] = k
      continue
    tally.executed += runs
    work[k] = _instruction_work(instr, shapes, computations, chip, runs, flops_cache, tally)
    found = _collective_carrier(instr, name, computations, local_shape, axis_names, num_slices)
    if found is None:
      continue
    c = collective_of(found[0], found[1], local_shape, axis_names, num_slices)
    if c is None:
      continue
    if c.crosses_slices:
      tally.dcn += runs
      continue
    key = _span_key(instr, found[0])
    if key in spans:
      spans[key][1] = k
    else:
      spans[key] = [k, k, c, f'{c.kind} ' + _group_name(found[0])]
  return work, spans


def _instruction_work(
  instr: Instruction, shapes: dict[str, str], computations: dict, chip, runs: int, flops_cache: dict, tally: _Tally
) -> float:
  """One run's max(dot FLOPs / bf16 peak, HBM bytes / HBM bandwidth) of an instruction; charges `runs` runs of its
  compute, HBM, FLOPs and libtpu cycles (or a missing cycle count) to `tally`."""
  peak, bw = chip.peak_bf16_flops, chip.hbm_bytes_per_s
  flops = dot_flops(instr, shapes) + sum(
    _body_flops(c, computations, flops_cache) for c in re.findall(r'calls=(%[\w.\-]+)', instr.attrs)
  )
  hbm = instruction_hbm_bytes(instr, shapes, computations)
  work = max(flops / peak, hbm / bw)
  tally.totals['compute'] += flops / peak * runs
  tally.totals['hbm'] += hbm / bw * runs
  tally.totals['flops'] += flops * runs
  tally.groups[_group_name(instr)] += work * runs
  cycles = _CYCLES.search(instr.attrs)
  if cycles:
    tally.totals['cycles'] += int(cycles.group(1)) * runs
  else:
    tally.missing[instr.op] += runs
  return work


def _collective_carrier(
  instr: Instruction,
  name: str,
  computations: dict,
  local_shape: tuple[int, ...],
  axis_names: tuple[str, ...],
  num_slices: int,
) -> tuple[Instruction, str] | None:
  """(the instruction that states a collective, its computation's name): `instr` itself (a collective op or a
  send), or for a fusion the collective in its body (TPU's async collective fusion); None when there is none."""
  if _OP.match(instr.line) or instr.op == 'send':
    return instr, name
  if instr.op != 'fusion':
    return None
  for c in re.findall(r'calls=(%[\w.\-]+)', instr.attrs):
    found = _body_collective(c, computations, local_shape, axis_names, num_slices)
    if found:
      return found
  return None


def _span_key(instr: Instruction, carrier: Instruction) -> str:
  """The key of a collective's span: a *-start's name, else the channel_id its carrier states (an async collective
  fusion's start and done share it), else the instruction's name."""
  if instr.op.endswith('-start'):
    return instr.name
  ch = _CHANNEL.search(carrier.attrs)
  return f'channel {ch.group(1)}' if ch else instr.name


def _charge_collectives(spans: dict, work: list[float], runs: int, chip, torus, tally: _Tally) -> None:
  """Charges `runs` runs of each collective span to `tally`: its ICI time in full, and to the per-op figure what
  the work in flight with it leaves exposed."""
  for first, last, c, group in spans.values():
    t = collective_seconds(c, chip, torus)
    between = sum(work[first + 1 : last])
    if last > first:  # asynchronous: hidden behind the work in flight with it
      exposed = max(0.0, t - between)
    else:  # synchronous: the instruction moves its data while it sends
      exposed = max(0.0, t - work[first])
    tally.totals['ici'] += t * runs
    tally.totals['exposed'] += exposed * runs
    tally.groups[group] += exposed * runs


def _per_op_of(tally: _Tally, top: int) -> PerOp:
  """The PerOp of a finished tally, with its `top` largest op_name groups."""
  totals, groups, missing = tally.totals, tally.groups, tally.missing
  t_per_op = sum(groups.values())
  return PerOp(
    t_per_op,
    totals['compute'] + totals['hbm'] + totals['ici'],
    totals['compute'],
    totals['hbm'],
    totals['ici'],
    totals['exposed'],
    totals['flops'],
    [(n, t) for n, t in groups.most_common(top) if t > 0],
    tally.executed,
    tally.dcn,
    float(totals['cycles']),
    sum(missing.values()),
    dict(missing.most_common()),
  )


def per_op_fields(per_op: PerOp, chip) -> tuple[dict, dict, dict]:
  """ProgramReport's per_op, floor and libtpu_cycles dicts (times only: the caller adds tokens/s and MFU)."""
  estimate = {
    't_step_s': per_op.t_per_op_s,
    't_floor_s': per_op.t_floor_s,
    't_compute_s': per_op.t_compute_s,
    't_hbm_s': per_op.t_hbm_s,
    't_ici_s': per_op.t_ici_s,
    't_ici_exposed_s': per_op.t_ici_exposed_s,
    'dot_flops_per_chip': per_op.dot_flops,
    'executed': per_op.executed,
    'dcn_collectives': per_op.dcn_collectives,
  }
  cycles = {
    'cycles': per_op.cycles,
    'clock_hz': chip.clock_hz,
    't_step_s': per_op.cycles / chip.clock_hz if chip.clock_hz else float('nan'),
    'missing_executions': per_op.cycles_missing,
    'missing_ops': per_op.cycles_missing_ops,
  }
  return estimate, {'t_step_s': per_op.t_floor_s}, cycles


def summarize(found: list[Collective]) -> dict:
  """{kind: {count, executions, bytes, ici_bytes, dcn_bytes, by_axes: {'fsdp': count, ...}, crossing_slices}}.

  count: logical collectives (one per channel_id); executions: how many run per step (loops times their trip
  count); bytes: summed result bytes of the logical ones (once each); ici_bytes / dcn_bytes: bytes one chip sends
  per step (every execution): an estimate (Collective.ici_bytes)."""
  out = {}
  for kind in KINDS:
    ops = [c for c in found if c.kind == kind]
    if not ops:
      continue
    by_axes = collections.Counter('+'.join(c.axes) or 'none' for c in ops)
    out[kind] = {
      'count': len(ops),
      'executions': sum(c.executions for c in ops),
      'bytes': sum(c.bytes for c in ops),
      # ICI within a slice; what crosses slices goes over DCN (not in the roofline's ICI term)
      'ici_bytes': sum(c.ici_bytes() * c.executions for c in ops if not c.crosses_slices),
      'dcn_bytes': sum(c.bytes * c.executions for c in ops if c.crosses_slices),
      'by_axes': dict(sorted(by_axes.items())),
      'crossing_slices': sum(c.crosses_slices for c in ops),
    }
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
  estimate: dict  # roofline(compute FLOPs, HBM estimate, ICI) + tokens_per_s + mfu
  notes: list = dataclasses.field(default_factory=list)
  compute_flops_per_chip: float = 0.0  # max(XLA's FLOPs, model FLOPs / chips): XLA counts a loop body once
  hbm_bytes_per_chip: float = 0.0  # hbm_traffic(): the ESTIMATED HBM traffic per step
  hbm_by_op_name: dict = dataclasses.field(default_factory=dict)  # its largest groups
  estimate_xla_bytes: dict = dataclasses.field(default_factory=dict)  # the ceiling if every XLA byte were HBM
  # per_op_times: the headline estimate (per_op) and the no-overlap floor (floor), each with t_step_s, tokens_per_s
  # and mfu; per_op also its terms. `estimate` above is the ceiling (perfect overlap).
  per_op: dict = dataclasses.field(default_factory=dict)
  floor: dict = dataclasses.field(default_factory=dict)
  top_ops: list = dataclasses.field(default_factory=list)  # [(op_name, per-op seconds)], largest first
  # libtpu's per-instruction cost model summed over executed instructions: cycles, clock_hz, t_step_s, mfu and
  # what it leaves out (executed instructions without a cycle count, by op)
  libtpu_cycles: dict = dataclasses.field(default_factory=dict)
  # XLA's and libtpu's own figures as the compiler returned them: the whole cost_analysis() (flops, bytes accessed,
  # per-operand bytes, utilization, libtpu's optimal_seconds) and memory_analysis() (its byte counts)
  xla_cost_analysis: dict = dataclasses.field(default_factory=dict)
  xla_memory_analysis: dict = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def _gib(n: float) -> str:
  return f'{n / tpu_chips.GIB:.2f} GiB' if abs(n) >= 0.1 * tpu_chips.GIB else f'{n / 2**20:.2f} MiB'


def format_report(r: ProgramReport) -> list[str]:
  """The printed report of one compiled program, one line per item: memory and traffic, collectives, the per-op
  estimate, the ceiling, notes."""
  return (
    _memory_lines(r) + _collective_lines(r) + _per_op_lines(r) + _ceiling_lines(r) + [f'  note: {n}' for n in r.notes]
  )


def _rate(r: ProgramReport, d: dict) -> str:
  """An estimate's step time, with target tokens/s and MFU where the program has tokens per step."""
  if r.tokens_per_step:
    return f'{d["t_step_s"] * 1e3:.2f} ms, {d["tokens_per_s"]:,.0f} target tokens/s, MFU {d["mfu"] * 100:.1f}%'
  return f'{d["t_step_s"] * 1e3:.2f} ms'


def _memory_lines(r: ProgramReport) -> list[str]:
  """The heading, HBM per chip, XLA's FLOPs and bytes accessed, and the HBM traffic estimate with its largest
  op_names."""
  m = r.memory
  mesh = ' '.join(f'{k}={v}' for k, v in r.mesh.items())
  lines = [
    f'{r.program} on {r.topology} ({r.chips} chips {r.chip}, mesh {mesh}): compiled in {r.compile_s:.1f} s',
    f'  HBM per chip: params+optimizer {_gib(m["state"])}, batch {_gib(m["batch"])}, tiled-layout padding + '
    f'other args {_gib(m["other_args"])}, temporaries {_gib(m["temporaries"])}, outputs '
    f'{_gib(m["outputs"])}; total {_gib(m["total"])} of {_gib(m["hbm"])}: '
    f'{"fits" if r.fits else "DOES NOT FIT"}',
    f'  XLA per chip per step: {r.flops_per_chip / 1e12:.3f} TFLOP, {_gib(r.bytes_accessed_per_chip)} accessed '
    '(every operand and result, VMEM-resident ones too; loop bodies once)',
    f'  HBM traffic per chip per step, estimate (HBM-resident operands and results after memory-space '
    f'assignment, loops x trip count): {_gib(r.hbm_bytes_per_chip)}',
  ]
  if r.hbm_by_op_name:
    short = lambda name: name.replace('transpose(jvp(Transformer))/', 'backward ').replace('jvp(Transformer)/', '')
    lines.append(
      '    largest: ' + '; '.join(f'{_gib(b)} {short(name)}' for name, b in list(r.hbm_by_op_name.items())[:5])
    )
  return lines


def _collective_lines(r: ProgramReport) -> list[str]:
  """The collectives by kind: logical count, runs per step, bytes, ICI bytes and the mesh axes they span."""
  if not r.collectives:
    return ['  collectives: none']
  lines = [
    '  collectives (logical: one per channel_id; runs per step where loops repeat them; bytes = largest '
    'result array, summed; ICI = bytes a chip sends per step, estimate):'
  ]
  for kind, s in r.collectives.items():
    axes = ', '.join(f'{a}: {n}' for a, n in s['by_axes'].items())
    cross = f', {s["crossing_slices"]} of them across slices (DCN)' if s['crossing_slices'] else ''
    runs = s.get('executions', s['count'])
    runs = f' ({runs} runs)' if runs != s['count'] else ''
    lines.append(
      f'    {kind}: {s["count"]} ops{runs}, {_gib(s["bytes"])}, ICI {_gib(s["ici_bytes"])} (over {axes}){cross}'
    )
  return lines


def _per_op_lines(r: ProgramReport) -> list[str]:
  """The per-op roofline (the headline) with its terms and range, libtpu's own cycles, and the largest per-op
  times."""
  e, p, f, cy = r.estimate, r.per_op, r.floor, r.libtpu_cycles
  lines = []
  if p:
    lines.append(
      '  ESTIMATE per-op roofline (headline: each executed instruction takes max(dot FLOPs / bf16 peak, '
      f'HBM bytes / bandwidth), collectives what their overlap leaves exposed): {_rate(r, p)}'
    )
    lines.append(
      f'    terms: dot FLOPs {p["t_compute_s"] * 1e3:.2f} ms, HBM {p["t_hbm_s"] * 1e3:.2f} ms, ICI '
      f'{p["t_ici_s"] * 1e3:.2f} ms of which {p["t_ici_exposed_s"] * 1e3:.2f} ms exposed '
      f'({p["executed"]:,} instructions executed)'
    )
    lines.append(f'    range: ceiling (perfect overlap) {_rate(r, e)}; floor (no overlap) {_rate(r, f)}')
  if cy:
    lines.append(
      f"    libtpu's own per-instruction cycles at {cy['clock_hz'] / 1e9:.2f} GHz: {_rate(r, cy)}; leaves out "
      f'{cy["missing_executions"]:,} executed instructions without a cycle count ('
      + ', '.join(f'{op} {n}' for op, n in list(cy['missing_ops'].items())[:5])
      + ')'
    )
  if r.top_ops:
    lines.append('    largest per-op times (by op_name, layers folded; a collective by its kind and op_name):')
    lines.extend(f'      {t * 1e3:8.3f} ms  {name}' for name, t in r.top_ops)
  return lines


def _ceiling_lines(r: ProgramReport) -> list[str]:
  """The ceiling (perfect overlap), with MFU where the program has tokens per step, the ceiling on XLA's bytes,
  the calibration, and libtpu's optimal_seconds where it can be a time."""
  e, x = r.estimate, r.estimate_xla_bytes
  times = (
    f'compute {e["t_compute_s"] * 1e3:.2f} ms, HBM {e["t_hbm_s"] * 1e3:.2f} ms, ICI {e["t_ici_s"] * 1e3:.2f} '
    f'ms -> {e["t_step_s"] * 1e3:.2f} ms ({e["bound_by"]}-bound)'
  )
  lines = []
  if r.tokens_per_step:
    lines.append(
      f'  ceiling (roofline of {r.compute_flops_per_chip / 1e12:.3f} TFLOP, the HBM estimate and ICI over '
      f'the bidirectional bandwidth, perfect overlap): {times}, MFU {e["mfu"] * 100:.1f}% '
      f'({r.model_flops / 1e12:.2f} model TFLOP per step)'
    )
    if x:
      lines.append(
        f"  ceiling with XLA's bytes accessed as HBM traffic: MFU {x['mfu'] * 100:.1f}% "
        f'({x["t_hbm_s"] * 1e3:.2f} ms of HBM -> {x["t_step_s"] * 1e3:.2f} ms, '
        f'{x["tokens_per_s"]:,.0f} tokens/s)'
      )
    if r.per_op:
      lines.append(f'  calibrated on: {tpu_chips.CALIBRATION}')
  else:
    lines.append(f'  ceiling of the counted work: {times}; no tokens/s or MFU for a decoding loop')
  optimal = r.xla_cost_analysis.get('optimal_seconds', 0.0)
  if optimal > 0:  # whole train steps get negative values: printed only where it can be a time
    lines.append(f"  libtpu's optimal_seconds: {optimal * 1e3:.2f} ms")
  return lines
