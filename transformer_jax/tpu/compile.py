"""`transformer-jax compile`: the programs a run executes, compiled ahead of time for a TPU slice on this machine.

libtpu (the `[tpu]` extra) compiles for any TPU topology without owning one. The train step is lowered exactly as
training runs it (train.py's jit_train_step, under jax.set_mesh and the logical-axis rules: without them the
activation constraints are silently inactive and a different program compiles), then the eval step and the
decoding loops (greedy and beam search for translation, sampling for language models). Nothing is allocated.

Use it from code: compile_programs(config, 'v5e-16', num_slices=1, programs=('train',)) -> [ProgramReport].
"""

from __future__ import annotations

import copy
import dataclasses
import gzip
import importlib.util
import json
import math
import os
import re
import sys
import time

from transformer_jax.inference import evaluation
from transformer_jax.tpu import chips as tpu_chips
from transformer_jax.tpu import report as tpu_report
from transformer_jax import errors

PROGRAMS = ('train', 'eval', 'greedy', 'beam', 'sample')
_BATCH_KEYS = {
  'encoder_decoder': (
    'inputs',
    'targets',
    'inputs_segmentation',
    'targets_segmentation',
    'inputs_position',
    'targets_position',
  ),
  'decoder': ('targets', 'targets_segmentation', 'targets_position'),
}
_GENERATIONS = {'v4': 'v4', 'v5p': 'v5p', 'v5e': 'v5e', 'v5litepod': 'v5e', 'v6e': 'v6e'}
# Slice shapes by chip count (Cloud TPU docs' configuration tables): 2D torus for v5e/v6e, 3D for v4/v5p.
_SHAPES = {
  2: {4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)},
  3: {
    4: (2, 2, 1),
    8: (2, 2, 2),
    16: (2, 2, 4),
    32: (2, 4, 4),
    64: (4, 4, 4),
    128: (4, 4, 8),
    256: (4, 8, 8),
    512: (8, 8, 8),
    1024: (8, 8, 16),
    2048: (8, 16, 16),
    4096: (16, 16, 16),
  },
}


class DoesNotFit(errors.UserError, ValueError):
  """Parameters and optimizer state alone exceed the chips' HBM: refused before compiling."""

  exit_code = errors.FAILED  # `compile` answers "does not fit" with exit 1


@dataclasses.dataclass(frozen=True)
class Topology:
  chip: tpu_chips.Chip
  name: str  # libtpu's topology string, e.g. 'v5e:2x4'
  chips: int  # per slice

  @property
  def torus(self) -> tuple[int, ...]:
    """The slice's chips as a grid (v5e:4x4 -> (4, 4)); one chip -> (1,)."""
    if self.chips == 1:
      return (1,)
    return tuple(int(d) for d in self.name.split(':')[1].split('x'))

  @property
  def label(self) -> str:
    return f'{self.name} ({self.chips} chip{"s" if self.chips > 1 else ""})'


def parse_topology(text: str) -> Topology:
  """'v4-8' (8 TensorCores = 4 chips), 'v5p-8' (4 chips), 'v5litepod-16' / 'v5e-16' / 'v6e-8' (chips), or a
  topology string 'v5e:4x4' / 'v4:2x2x2'."""
  m = re.fullmatch(r'(v4|v5p|v5e|v5litepod|v6e)(?:-(\d+)|:(\d+(?:x\d+)+))', text.strip().lower())
  if not m:
    raise ValueError(
      f'unknown TPU topology {text!r}: expected e.g. v4-8, v5p-8, v5litepod-16, v5e-16, v6e-8 or v5e:4x4'
    )
  chip = tpu_chips.CHIPS[_GENERATIONS[m.group(1)]]
  if m.group(3):
    dims = tuple(int(d) for d in m.group(3).split('x'))
    if len(dims) != chip.dims:
      raise ValueError(f'{chip.name} topologies have {chip.dims} dimensions, got {m.group(3)}')
    return Topology(chip, f'{chip.name}:{m.group(3)}', math.prod(dims))
  count = int(m.group(2))
  if count % chip.cores_per_chip:
    raise ValueError(f'{text}: {chip.name} accelerator types count TensorCores ({chip.cores_per_chip} per chip)')
  chips = count // chip.cores_per_chip
  if chips == 1 and chip.dims == 2:
    return Topology(chip, f'{chip.name}:2x2', 1)  # libtpu refuses 1x1: one chip of a 2x2 host
  if chips not in _SHAPES[chip.dims]:
    raise ValueError(
      f'{text}: no known {chip.name} slice of {chips} chips (known: '
      f'{", ".join(str(n * chip.cores_per_chip) for n in _SHAPES[chip.dims])})'
    )
  return Topology(chip, f'{chip.name}:{"x".join(map(str, _SHAPES[chip.dims][chips]))}', chips)


def require_libtpu() -> None:
  if importlib.util.find_spec('libtpu') is None:
    raise RuntimeError("the TPU compiler (libtpu) is not installed: pip install -e '.[tpu]'")


def topology_devices(topology: Topology, num_slices: int = 1) -> list:
  """Compile-only TPU devices (one per chip, as JAX on a slice sees them: megacore on v4/v5p)."""
  require_libtpu()
  # Compiling touches no TPU: let several compiling processes (test workers, a second shell) load libtpu at once.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from jax.experimental import topologies

  kwargs = {'chip_config_name': 'megacore'} if topology.chip.cores_per_chip > 1 else {}
  if num_slices > 1:
    if topology.chips == 1:
      raise ValueError('--num_slices needs slices of more than one chip')
    kwargs['num_slices'] = num_slices
  devices = list(topologies.get_topology_desc(topology.name, 'tpu', **kwargs).devices)
  return devices[:1] if topology.chips == 1 else devices


def slice_config(config, num_slices: int, notes: list[str]):
  """A copy of the config whose mesh spans `num_slices` slices over DCN (mesh.dcn_data)."""
  config = copy.deepcopy(config)
  with config.unlocked():
    config.mesh.num_devices = 0
    config.mesh.dcn_data = num_slices
    if num_slices > 1 and int(config.mesh.data) == 1:
      config.mesh.data = num_slices
      notes.append(f'mesh.data=1 -> {num_slices}: the data axis spans the {num_slices} slices (mesh.dcn_data)')
  return config


def build_mesh(config, devices):
  """parallel.make_mesh's layout for these devices: hybrid (DCN x ICI) over slices, topology-aware within one."""
  import jax
  import numpy as np
  from transformer_jax import parallel

  shape = parallel.mesh_shape(config.mesh, len(devices))
  dcn = int(config.mesh.get('dcn_data', 1))
  axis_types = (jax.sharding.AxisType.Auto,) * len(parallel.MESH_AXES)
  if dcn > 1:
    array = parallel.hybrid_device_array(shape, dcn, devices)
  elif len(devices) > 1:  # what make_mesh does with all of a slice's devices
    return jax.make_mesh(shape, parallel.MESH_AXES, axis_types=axis_types, devices=devices)
  else:
    array = np.asarray(devices, dtype=object).reshape(shape)
  return jax.sharding.Mesh(array, parallel.MESH_AXES, axis_types=axis_types)


def preflight(config, topology: Topology, num_slices: int) -> int:
  """Per-chip bytes of parameters + optimizer state (info.memory_plan); DoesNotFit when they alone exceed HBM."""
  from transformer_jax import info

  chips = topology.chips * num_slices
  per_chip = info.memory_plan(config, chips)[4]
  if per_chip > topology.chip.hbm_bytes:
    raise DoesNotFit(
      f'does not fit: parameters + optimizer state alone take {per_chip / tpu_chips.GIB:.2f} GiB per '
      f'chip on {chips} chips of {topology.chip.name} ({topology.chip.hbm_bytes / tpu_chips.GIB:.0f} '
      'GiB HBM each); not compiled. Use more chips or a larger mesh.fsdp'
    )
  return per_chip


def _shard_bytes(tree) -> int:
  import jax
  import numpy as np

  shard = lambda x: x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape  # None: replicated
  return int(sum(math.prod(shard(x)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def default_programs(config) -> tuple[str, ...]:
  lm = config.model.get('kind', 'encoder_decoder') == 'decoder'
  return ('train', 'eval', 'sample') if lm else ('train', 'eval', 'greedy', 'beam')


class _Setup:
  """The model, the abstract sharded state and batch on the topology's mesh: everything eager happens here,
  before the mesh context (an eager op inside jax.set_mesh of compile-only devices fails)."""

  def __init__(self, config, devices):
    import jax
    import jax.numpy as jnp
    from transformer_jax.training import optim
    from transformer_jax import parallel
    from transformer_jax.training import train_state
    from transformer_jax.model.transformer import build_model

    self.config = config
    self.mesh = build_mesh(config, devices)
    if config.batch_size % (self.mesh.shape['data'] * self.mesh.shape['fsdp']):
      raise ValueError(
        f'batch_size={config.batch_size} is not divisible by the batch axes data*fsdp='
        f'{self.mesh.shape["data"] * self.mesh.shape["fsdp"]}'
      )
    self.cfg = train_state.model_config(config, platform='tpu')  # model.dtype='auto' is bfloat16 there
    self.model = build_model(self.cfg)
    self.tx = optim.make_optimizer(config)
    self.state_shardings = parallel.logical_shardings(
      train_state.state_logical_specs(self.model, self.tx, config), self.mesh
    )
    self.state = train_state.abstract_state(self.model, self.tx, config, self.state_shardings)
    batch_sharding = parallel.batch_sharding(self.mesh)
    self.kind = config.model.get('kind', 'encoder_decoder')
    lengths = {'inputs': config.packed_inputs_length, 'targets': config.packed_targets_length}
    self.batch = {
      k: jax.ShapeDtypeStruct((config.batch_size, lengths[k.split('_')[0]]), jnp.int32, sharding=batch_sharding)
      for k in _BATCH_KEYS[self.kind]
    }
    key = jax.random.key(0)
    self.rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=parallel.replicated(self.mesh))
    rows = int(config.get('eval_translate_batch_size', 256))
    self.decode_inputs = jax.ShapeDtypeStruct((rows, config.max_length), jnp.int32, sharding=batch_sharding)
    self.sample_args = (
      jax.ShapeDtypeStruct((8, self.cfg.max_len), jnp.int32),  # generate_texts: rows of 8
      jax.ShapeDtypeStruct((8,), jnp.int32),
      self.rng,
      jax.ShapeDtypeStruct((), jnp.float32),
      jax.ShapeDtypeStruct((), jnp.float32),
      jax.ShapeDtypeStruct((), jnp.int32),
    )

  def lower(self, program: str):
    """(lowered, state-like args, batch-like args) of one program, lowered under the mesh and the rules."""
    import jax
    from flax import linen as nn
    from transformer_jax.inference import decode
    from transformer_jax.inference import generate
    from transformer_jax import parallel
    from transformer_jax.training import train

    params, config = self.state.params, self.config
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
      if program == 'train':
        step = train.jit_train_step(self.model, self.tx, config, self.mesh, self.state_shardings)
        return step.lower(self.state, self.batch, self.rng), self.state, self.batch
      if program == 'eval':
        return jax.jit(evaluation.make_eval_step(self.model, config)).lower(params, self.batch), params, self.batch
      if program == 'greedy':
        return (
          decode.greedy_decode.lower(params, self.decode_inputs, cfg=self.cfg, max_decode_len=config.max_length),
          params,
          self.decode_inputs,
        )
      if program == 'beam':
        return (
          decode.beam_search.lower(
            params, self.decode_inputs, cfg=self.cfg, beam_size=4, alpha=0.6, max_decode_len=config.max_length
          ),
          params,
          self.decode_inputs,
        )
      if program == 'sample':
        return generate.generate_ids.lower(params, *self.sample_args, cfg=self.cfg), params, self.sample_args[0]
    raise ValueError(f'unknown program {program!r}; expected one of {", ".join(PROGRAMS)}')


def _param_shapes(params) -> dict[str, tuple]:
  import jax

  return {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def analyse(
  program: str,
  compiled,
  setup: _Setup,
  topology: Topology,
  num_slices: int,
  compile_s: float,
  state,
  batch,
  notes: list[str],
) -> tpu_report.ProgramReport:
  """The per-chip figures of a compiled program (memory, cost, collectives) and their roofline estimate."""
  chip, chips = topology.chip, topology.chips * num_slices
  stats = compiled.memory_analysis()
  memory = _memory_per_chip(stats, state, batch, chip)
  cost = _cost_analysis(compiled)
  flops, accessed = float(cost.get('flops', 0.0)), float(cost.get('bytes accessed', 0.0))
  hlo = compiled.as_text()
  mesh_shape, axis_names = tuple(setup.mesh.devices.shape), setup.mesh.axis_names
  summary = tpu_report.summarize(tpu_report.collectives(hlo, mesh_shape, axis_names, num_slices))
  ici = sum(s['ici_bytes'] for s in summary.values())
  hbm = tpu_report.hbm_traffic(hlo)
  tokens, model_flops = _model_work(program, setup)
  # XLA counts a while loop's body once (windowed-einsum loops, scanned layers): the model's FLOPs per chip are the
  # floor of the work; HBM is the estimate from the HLO after memory-space assignment, not XLA's bytes accessed
  compute = max(flops, model_flops / chips)
  estimate = tpu_chips.roofline(chip, compute, hbm.bytes, ici)
  estimate_xla_bytes = tpu_chips.roofline(chip, compute, accessed, ici)  # the ceiling if every XLA byte were HBM
  per_op = tpu_report.per_op_times(hlo, chip, mesh_shape, axis_names, num_slices, torus=topology.torus)
  per_op_estimate, floor, cycles = tpu_report.per_op_fields(per_op, chip)
  rated = (estimate, estimate_xla_bytes, per_op_estimate, floor, cycles)
  _rate_estimates(rated, program, tokens, model_flops, chip, chips)
  notes = notes + _estimate_notes(program, setup, per_op, hbm)
  return tpu_report.ProgramReport(
    program=program,
    topology=topology.name + (f' x {num_slices} slices' if num_slices > 1 else ''),
    chips=chips,
    num_slices=num_slices,
    mesh=dict(setup.mesh.shape),
    chip=chip.name,
    compile_s=compile_s,
    memory=memory,
    fits=memory['total'] <= chip.hbm_bytes,
    flops_per_chip=flops,
    bytes_accessed_per_chip=accessed,
    collectives=summary,
    model_flops=model_flops,
    tokens_per_step=tokens,
    estimate=estimate,
    notes=list(notes),
    compute_flops_per_chip=compute,
    hbm_bytes_per_chip=hbm.bytes,
    hbm_by_op_name=hbm.by_op_name,
    estimate_xla_bytes=estimate_xla_bytes,
    per_op=per_op_estimate,
    floor=floor,
    top_ops=[list(t) for t in per_op.top],
    libtpu_cycles=cycles,
    xla_cost_analysis=dict(cost),
    xla_memory_analysis=_memory_fields(stats),
  )


def _cost_analysis(compiled) -> dict:
  """XLA's cost_analysis() of the compiled program (one dict: some versions return a list of one)."""
  cost = compiled.cost_analysis()
  return cost[0] if isinstance(cost, (list, tuple)) else cost


def _memory_per_chip(stats, state, batch, chip) -> dict:
  """ProgramReport's memory: bytes per chip of state, batch, other arguments, temporaries, outputs (less what
  aliases an argument), their total, and the chip's HBM."""
  state_bytes, batch_bytes = _shard_bytes(state), _shard_bytes(batch)
  outputs = stats.output_size_in_bytes - stats.alias_size_in_bytes
  return {
    'state': state_bytes,
    'batch': batch_bytes,
    'other_args': stats.argument_size_in_bytes - state_bytes - batch_bytes,
    'temporaries': stats.temp_size_in_bytes,
    'outputs': outputs,
    'total': stats.argument_size_in_bytes + outputs + stats.temp_size_in_bytes,
    'hbm': chip.hbm_bytes,
  }


def _model_work(program: str, setup: _Setup) -> tuple[int, float]:
  """(target tokens per step, the model's FLOPs per step): both zero for a decoding program."""
  config = setup.config
  tokens = config.batch_size * config.packed_targets_length
  model_flops = tpu_chips.model_flops_per_step(
    _param_shapes(setup.state.params),
    config.model,
    config.batch_size,
    config.packed_inputs_length if setup.kind != 'decoder' else 0,
    config.packed_targets_length,
    training=program == 'train',
  )
  if program not in ('train', 'eval'):
    tokens, model_flops = 0, 0.0
  return tokens, model_flops


def _estimate_notes(program: str, setup: _Setup, per_op: tpu_report.PerOp, hbm: tpu_report.HbmTraffic) -> list[str]:
  """Notes on what the estimates leave out (collectives across slices, loops of unknown trip count) and, for a
  decoding program, what its FLOPs count and its decode cache's bytes per token."""
  notes = []
  if per_op.dcn_collectives:
    notes.append(f'{per_op.dcn_collectives} collective runs cross slices (DCN): not in the per-op ICI term')
  if hbm.unknown_trip_counts:
    notes.append(
      f'{hbm.unknown_trip_counts} while loop(s) of unknown trip count: their bodies are counted once '
      'in the HBM estimate and the collectives'
    )
  if program not in ('train', 'eval'):
    notes.extend(_decoding_notes(setup))
  return notes


def _rate_estimates(rated: tuple[dict, ...], program: str, tokens: int, model_flops: float, chip, chips: int) -> None:
  """Adds tokens_per_s and mfu to each estimate: NaN for a decoding program."""
  if program in ('train', 'eval'):
    for e in rated:
      e['tokens_per_s'] = tokens / e['t_step_s'] if e['t_step_s'] else float('nan')
      e['mfu'] = tpu_chips.mfu(model_flops, e['t_step_s'], chip, chips)
  else:
    for e in rated:
      e.update(tokens_per_s=float('nan'), mfu=float('nan'))


def _decoding_notes(setup: _Setup) -> list[str]:
  """Notes for a decoding program: XLA's FLOPs are per loop iteration, and the decode cache's bytes per token."""
  from transformer_jax.model import config as model_config

  return [
    'a decoding loop: XLA counts a while loop body once, so its FLOPs are per loop iteration plus '
    'set-up, not per sequence (the HBM estimate and the collectives multiply loops whose trip '
    'count the HLO states)',
    f'decode cache: {model_config.kv_cache_bytes_per_token(setup.cfg):,} bytes per token and sequence '
    f'(self-attention keys and values of every layer, model.kv_cache_dtype={setup.cfg.kv_cache_dtype})',
  ]


def _memory_fields(stats) -> dict:
  """memory_analysis()'s byte counts (its serialized buffer-assignment proto is binary: left out)."""
  return {
    k: getattr(stats, k)
    for k in dir(stats)
    if not k.startswith('_') and isinstance(getattr(stats, k, None), (int, float))
  }


def _print_now(line: str) -> None:
  print(line, flush=True)


def compile_programs(
  config,
  topology: str | Topology,
  num_slices: int = 1,
  programs=None,
  progress=_print_now,
  keep_compiled: bool = False,
  hlo_prefix: str | None = None,
) -> list[tpu_report.ProgramReport]:
  """Compiles each program for the topology (x num_slices) and reports it. Raises DoesNotFit (before compiling)
  when parameters and optimizer state alone exceed HBM. keep_compiled: the reports carry `.compiled` (tests).
  hlo_prefix: also write each compiled program's HLO text to HLO_PREFIX.PROGRAM.hlo.gz."""
  topology = parse_topology(topology) if isinstance(topology, str) else topology
  notes: list[str] = []
  config = slice_config(config, num_slices, notes)
  devices = topology_devices(topology, num_slices)
  preflight(config, topology, num_slices)
  setup = _Setup(config, devices)
  reports = []
  for program in programs or default_programs(config):
    progress(
      f'compiling {program} step for {topology.label}' + (f' x {num_slices} slices' if num_slices > 1 else '') + ' ...'
    )
    start = time.perf_counter()
    lowered, state, batch = setup.lower(program)
    compiled = lowered.compile()
    if hlo_prefix:
      with gzip.open(f'{hlo_prefix}.{program}.hlo.gz', 'wt', encoding='utf-8') as f:
        f.write(compiled.as_text())
    report = analyse(program, compiled, setup, topology, num_slices, time.perf_counter() - start, state, batch, notes)
    if keep_compiled:
      report.compiled, report.lowered, report.setup, report.mesh_object = compiled, lowered, setup, setup.mesh
    reports.append(report)
  return reports


def define_flags(flags) -> None:
  here = {'module_name': 'transformer_jax.commands'}  # listed by `compile --help` (cli.py prints that module's)
  flags.DEFINE_string(
    'topology',
    None,
    'TPU slice to compile for: an accelerator type as launch/tpu_vm.sh takes '
    'it (v4-8 = 4 chips, v5p-8 = 4 chips, v5litepod-16, v6e-8), the short v5e-16, or a topology '
    'string (v5e:4x4, v4:2x2x2).',
    **here,
  )
  flags.DEFINE_integer(
    'num_slices',
    1,
    "Slices joined over DCN (multislice): the mesh's data axis spans them "
    '(mesh.dcn_data; mesh.data=1 becomes num_slices).',
    **here,
  )
  flags.DEFINE_list(
    'programs',
    [],
    f'Programs to compile, of {", ".join(PROGRAMS)} (default: train, eval and the '
    'decoding the model does: greedy and beam for translation, sample for language models).',
    **here,
  )
  flags.DEFINE_string('json', None, 'Also write the figures to this JSON file.', **here)
  flags.DEFINE_string(
    'hlo',
    None,
    "Also write each compiled program's HLO text (what the report reads: memory "
    'spaces, collectives) to HLO.PROGRAM.hlo.gz.',
    **here,
  )
  flags.DEFINE_list(
    'meshes',
    [],
    'Also compile the train step on each of these meshes and say which is fastest by '
    'the per-op estimate: data (data-parallel: data=-1, fsdp=1), fsdp (data=1, fsdp=-1), or '
    'DATAxFSDPxTENSOR (e.g. 2x4x1).',
    **here,
  )
  flags.mark_flag_as_required('topology')


MESH_CANDIDATES = {'data': dict(data=-1, fsdp=1, tensor=1), 'fsdp': dict(data=1, fsdp=-1, tensor=1)}


def _mesh_of(name: str) -> dict:
  if name in MESH_CANDIDATES:
    return MESH_CANDIDATES[name]
  m = re.fullmatch(r'(-?\d+)x(-?\d+)x(-?\d+)', name)
  if not m:
    raise ValueError(f'unknown mesh {name!r} in --meshes: expected data, fsdp or DATAxFSDPxTENSOR')
  return dict(zip(('data', 'fsdp', 'tensor'), (int(g) for g in m.groups())))


def compare_meshes(config, topology, num_slices: int, names, progress=_print_now) -> list[tuple[str, object]]:
  """[(mesh name, the train step's ProgramReport or the reason it was not compiled)], fastest per-op first."""
  results = []
  for name in names:
    candidate = copy.deepcopy(config)
    with candidate.unlocked():
      candidate.mesh.update(_mesh_of(name))
    try:
      results.append((name, compile_programs(candidate, topology, num_slices, ('train',), progress)[0]))
    except (DoesNotFit, ValueError) as e:
      results.append((name, str(e)))
  return sorted(results, key=lambda r: r[1].per_op['t_step_s'] if not isinstance(r[1], str) else float('inf'))


def format_mesh_comparison(results) -> list[str]:
  lines = ['meshes compared (train step, per-op estimate; ceiling in brackets):']
  for name, r in results:
    if isinstance(r, str):
      lines.append(f'  {name}: not compiled: {r}')
      continue
    mesh = ' '.join(f'{k}={v}' for k, v in r.mesh.items())
    lines.append(
      f'  {name} ({mesh}): {r.per_op["t_step_s"] * 1e3:.2f} ms, MFU {r.per_op["mfu"] * 100:.1f}% '
      f'({r.estimate["mfu"] * 100:.1f}%), {r.memory["total"] / tpu_chips.GIB:.2f} GiB per chip'
      + ('' if r.fits else ', DOES NOT FIT')
    )
  best = next((n for n, r in results if not isinstance(r, str) and r.fits), None)
  lines.append(f'fastest mesh by the per-op estimate: {best}' if best else 'no candidate mesh fits')
  return lines


def run(FLAGS) -> None:
  """The command body: prints each program's report; exits 1 when something does not fit."""
  try:
    require_libtpu()
  except RuntimeError as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)
  for name in FLAGS.meshes:
    _mesh_of(name)  # refused before minutes of compiling
  unknown = [p for p in FLAGS.programs if p not in PROGRAMS]
  if unknown:
    raise ValueError(f'unknown --programs {unknown}; expected some of {", ".join(PROGRAMS)}')
  try:
    reports = compile_programs(
      FLAGS.config, FLAGS.topology, FLAGS.num_slices, tuple(FLAGS.programs) or None, hlo_prefix=FLAGS.hlo
    )
  except DoesNotFit as e:
    if FLAGS.json:
      _write_json(
        FLAGS.json,
        {'topology': FLAGS.topology, 'num_slices': FLAGS.num_slices, 'fits': False, 'refused': str(e), 'programs': []},
      )
    print(str(e), flush=True)
    sys.exit(1)
  for report in reports:
    print('\n'.join(tpu_report.format_report(report)), flush=True)
  if FLAGS.meshes:
    print(
      '\n'.join(format_mesh_comparison(compare_meshes(FLAGS.config, FLAGS.topology, FLAGS.num_slices, FLAGS.meshes))),
      flush=True,
    )
  fits = all(r.fits for r in reports)
  if FLAGS.json:
    _write_json(
      FLAGS.json,
      {
        'topology': FLAGS.topology,
        'num_slices': FLAGS.num_slices,
        'fits': fits,
        'programs': [r.to_json() for r in reports],
      },
    )
  print(
    f'compile: {"fits" if fits else "does not fit"}: '
    + ' '.join(f'{r.program}={r.memory["total"] / tpu_chips.GIB:.2f}GiB' for r in reports)
    + f' of {reports[0].memory["hbm"] / tpu_chips.GIB:.0f}GiB per chip',
    flush=True,
  )
  if not fits:
    sys.exit(1)


def _write_json(path: str, payload: dict) -> None:
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(payload, f, indent=1, default=float)
