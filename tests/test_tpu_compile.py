"""`transformer-jax compile`: TPU programs compiled on this CPU machine by libtpu (the [tpu] extra; CI installs it).

A handful of small compiles (1 layer, d_model 64) shared by module fixtures; the rest is arithmetic and parsing.
"""

import importlib.util
import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

from transformer_jax.tpu import chips as tpu_chips
from transformer_jax.tpu import compile as tpu_compile
from transformer_jax.tpu import report as tpu_report

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(
  importlib.util.find_spec('libtpu') is None,
  reason="libtpu is not installed (pip install -e '.[tpu]'): no TPU compiler",
)


def small_config(**mesh):
  from configs import tiny

  config = tiny.get_config()
  config.model.update(num_layers=1, d_model=64, d_ff=128, num_heads=4)
  config.update(
    packed_inputs_length=32, packed_targets_length=32, max_length=32, batch_size=16, eval_translate_batch_size=16
  )
  config.mesh.update({**dict(data=1, fsdp=-1, tensor=1), **mesh})
  return config


def _by_program(reports):
  return {r.program: r for r in reports}


@pytest.fixture(scope='module')
def v5e():
  """Train, eval, greedy and beam of a translation model on v5e:2x2 (fsdp=4), compiled once per module."""
  config = small_config()
  return config, _by_program(
    tpu_compile.compile_programs(config, 'v5e:2x2', programs=('train', 'eval', 'greedy', 'beam'), keep_compiled=True)
  )


@pytest.fixture(scope='module')
def v4_tensor():
  """The train step on v4-8 (4 chips, megacore) with fsdp=2 x tensor=2."""
  config = small_config(fsdp=2, tensor=2)
  return config, tpu_compile.compile_programs(config, 'v4-8', programs=('train',), keep_compiled=True)[0]


# ---------------------------------------------------------------------------------------------------------------------
# Topologies, roofline, HLO parsing: no compiler


@pytest.mark.parametrize(
  'name, topology, chips, chip',
  [
    ('v4-8', 'v4:2x2x1', 4, 'v4'),
    ('v4-16', 'v4:2x2x2', 8, 'v4'),
    ('v5p-8', 'v5p:2x2x1', 4, 'v5p'),
    ('v5litepod-16', 'v5e:4x4', 16, 'v5e'),
    ('v5e-16', 'v5e:4x4', 16, 'v5e'),
    ('v5e-8', 'v5e:2x4', 8, 'v5e'),
    ('v6e-8', 'v6e:2x4', 8, 'v6e'),
    ('v5e:4x8', 'v5e:4x8', 32, 'v5e'),
    ('v5e-1', 'v5e:2x2', 1, 'v5e'),
  ],
)
def test_topology_names(name, topology, chips, chip):
  t = tpu_compile.parse_topology(name)
  assert (t.name, t.chips, t.chip.name) == (topology, chips, chip)


@pytest.mark.parametrize('name', ['v4-6', 'v5e-12', 'v3-8', 'v5e:4x4x4', 'tpu'])
def test_bad_topology_names_are_refused(name):
  with pytest.raises(ValueError):
    tpu_compile.parse_topology(name)


def test_roofline_is_the_slowest_of_three():
  rng = np.random.default_rng(0)
  for _ in range(200):
    c = tpu_chips.CHIPS[rng.choice(sorted(tpu_chips.CHIPS))]
    flops, hbm, ici = 10.0 ** rng.uniform(9, 16), 10.0 ** rng.uniform(6, 12), 10.0 ** rng.uniform(0, 11)
    r = tpu_chips.roofline(c, flops, hbm, ici)
    assert r['t_step_s'] == max(flops / c.peak_bf16_flops, hbm / c.hbm_bytes_per_s, ici / c.ici_bytes_per_s)
    assert r['t_step_s'] == r[f't_{r["bound_by"]}_s']
    # a compute-bound step whose model FLOPs are XLA's FLOPs on every chip is at 100% MFU
    assert tpu_chips.mfu(flops * 4, flops / c.peak_bf16_flops, c, 4) == pytest.approx(1.0)


def test_model_flops_are_six_params_tokens_plus_attention():
  shapes = {
    "['encoder']['wi']['kernel']": (8, 16),
    "['decoder']['wi']['kernel']": (8, 32),
    "['decoder']['cross_attention']['key']['kernel']": (8, 2, 4),
    "['decoder']['norm']['scale']": (8,),
    "['shared_embedding']['embedding']": (100, 8),
  }
  cfg = {'vocab_size': 100, 'd_model': 8, 'num_layers': 1}

  class Cfg(dict):
    __getattr__ = dict.__getitem__

  b, s, t = 2, 5, 3
  matmuls = 8 * 16 * b * s + 8 * 32 * b * t + 8 * 8 * b * s + 100 * 8 * b * t  # cross key on source positions
  attention = 2 * b * 8 * (s * s + t * t + t * s)
  expected = 6 * matmuls + 3 * 2 * attention
  assert tpu_chips.model_flops_per_step(shapes, Cfg(cfg), b, s, t) == expected
  assert tpu_chips.model_flops_per_step(shapes, Cfg(cfg), b, s, t, training=False) == expected / 3


_NAMES = ('data', 'fsdp', 'tensor')


@pytest.mark.parametrize('shape', list(itertools.product([1, 2, 4], repeat=3)))
def test_replica_groups_map_back_to_mesh_axes(shape):
  """Every replica-group syntax the TPU HLO uses names the mesh axes whose devices differ within a group."""
  for k in (1, 2, 3):
    for over in itertools.combinations(_NAMES, k):
      _check_groups(shape, list(over))


def _check_groups(shape, over):
  names = _NAMES
  ids = np.arange(int(np.prod(shape))).reshape(shape)
  rest = [i for i, a in enumerate(names) if a not in over]
  span = [names.index(a) for a in over]
  groups = ids.transpose(rest + span).reshape(-1, int(np.prod([shape[i] for i in span])))
  expected = tuple(a for a in over if shape[names.index(a)] > 1)
  mesh_form = (
    'x = f32[8] all-reduce(y), replica_groups=mesh['
    + ','.join(f"'axis_{i}'={n}" for i, n in enumerate(shape))
    + '] {'
    + ','.join(f"'axis_{names.index(a)}'" for a in over)
    + '}, to_apply=%add'
  )
  list_form = (
    'x = f32[8] all-reduce(y), replica_groups={'
    + ','.join('{' + ','.join(map(str, g)) + '}' for g in groups)
    + '}, to_apply=%add'
  )
  perm = rest + span
  iota_form = (
    f'x = f32[8] all-reduce(y), replica_groups=[{groups.shape[0]},{groups.shape[1]}]<=['
    + ','.join(map(str, shape))
    + ']T('
    + ','.join(map(str, perm))
    + '), to_apply=%add'
  )
  for line in (mesh_form, list_form, iota_form):
    got = tpu_report._groups(line, ids.size)
    assert sorted(map(sorted, got)) == sorted(map(sorted, groups.tolist())), line
    assert tpu_report.mesh_axes_of(got, tuple(shape), names) == expected, line


def test_without_libtpu_the_command_refuses_in_one_line(monkeypatch, capsys):
  real = importlib.util.find_spec
  monkeypatch.setattr(tpu_compile.importlib.util, 'find_spec', lambda n, *a: None if n == 'libtpu' else real(n, *a))
  with pytest.raises(SystemExit) as e:
    tpu_compile.run(None)
  assert e.value.code == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "pip install -e '.[tpu]'" in err[0]


# ---------------------------------------------------------------------------------------------------------------------
# Compiled programs


@needs_libtpu
def test_the_compiled_train_step_is_the_trained_one(v5e):
  """Same shardings in as training's jit_train_step, and the activation constraints active: lowered without the
  mesh context the same step has none (and XLA gathers whole-batch activations on every chip)."""
  import jax
  from transformer_jax.training import train

  config, reports = v5e
  r = reports['train']
  state_in, batch_in, _ = r.compiled.input_shardings[0]
  specs = lambda tree: [s.spec for s in jax.tree.leaves(tree)]
  assert specs(state_in) == specs(r.setup.state_shardings)
  assert any(len(s) and s[0] == 'fsdp' for s in specs(state_in))  # the rules shard weights, not all replicated
  assert all(s.spec == jax.sharding.PartitionSpec(('data', 'fsdp')) for s in jax.tree.leaves(batch_in))

  def constraints(text):
    return text.count('sharding_constraint') + text.count('@Sharding')

  in_context = r.lowered.as_text()
  model, tx, shardings = (r.setup.model, r.setup.tx, r.setup.state_shardings)
  outside = (
    train.jit_train_step(model, tx, r.setup.config, r.mesh_object, shardings)
    .lower(r.setup.state, r.setup.batch, r.setup.rng)
    .as_text()
  )
  assert constraints(in_context) > 0
  assert constraints(outside) == 0


@needs_libtpu
def test_report_figures_are_consistent(v5e):
  from transformer_jax import info

  config, reports = v5e
  r = reports['train']
  m = r.memory
  assert r.fits and m['total'] == m['state'] + m['batch'] + m['other_args'] + m['temporaries'] + m['outputs']
  assert m['other_args'] >= 0 and m['temporaries'] > 0
  assert r.flops_per_chip > 0 and r.bytes_accessed_per_chip > 0 and 0 < r.estimate['mfu'] < 1
  # the compiled program's per-chip state is the memory plan's; doubling fsdp halves it (within rounding)
  assert m['state'] == info.memory_plan(config, 4)[4]
  config2 = small_config(data=2)  # 4 chips: data=2, fsdp=2
  assert info.memory_plan(config2, 4)[4] / m['state'] == pytest.approx(2.0, rel=0.02)
  lines = tpu_report.format_report(r)
  assert 'fits' in lines[1] and any(line.startswith('  ESTIMATE') for line in lines)


@needs_libtpu
def test_collectives_are_on_the_axes_the_rules_name(v5e, v4_tensor):
  """fsdp: weights all-gathered and gradients reduce-scattered over fsdp; tensor adds collectives over tensor."""
  _, reports = v5e
  c = reports['train'].collectives
  assert set(c['all-gather']['by_axes']) == {'fsdp'}
  assert set(c['reduce-scatter']['by_axes']) == {'fsdp'}  # the gradient reduction (TPU's all-reduce-scatter fusion)
  assert all(set(s['by_axes']) <= {'fsdp'} for s in c.values())
  _, r = v4_tensor
  assert r.chip == 'v4' and r.chips == 4 and r.mesh == {'data': 1, 'fsdp': 2, 'tensor': 2}
  axes = {a for s in r.collectives.values() for a in s['by_axes']}
  assert axes <= {'fsdp', 'tensor', 'fsdp+tensor'} and 'fsdp' in r.collectives['all-gather']['by_axes']
  assert 'fsdp' in r.collectives['reduce-scatter']['by_axes']
  assert any('tensor' in a for a in axes)


@needs_libtpu
def test_hbm_estimate_and_logical_collectives_of_a_compiled_step(v5e):
  """On a real compiled train step: the HBM estimate is below XLA's bytes accessed (it drops VMEM-resident operands,
  XLA's count keeps them), the roofline uses it and the model's FLOPs where XLA's are lower, and the pessimistic
  bound uses XLA's bytes. Collectives tie to the model: each fsdp-split kernel (the embedding table included) is
  all-gathered once for its forward matmul and at most once more for its backward ones, plus the token ids of the
  two embedding lookups, gathered over fsdp in the forward and the backward pass (4 s32 gathers)."""
  import jax

  config, reports = v5e
  r = reports['train']
  assert 0 < r.hbm_bytes_per_chip < r.bytes_accessed_per_chip
  assert sum(r.hbm_by_op_name.values()) <= r.hbm_bytes_per_chip
  assert r.compute_flops_per_chip == max(r.flops_per_chip, r.model_flops / r.chips)
  chip = tpu_chips.CHIPS['v5e']
  assert r.estimate['t_hbm_s'] == pytest.approx(r.hbm_bytes_per_chip / chip.hbm_bytes_per_s)
  assert r.estimate_xla_bytes['t_hbm_s'] == pytest.approx(r.bytes_accessed_per_chip / chip.hbm_bytes_per_s)
  assert r.estimate['mfu'] >= r.estimate_xla_bytes['mfu']
  specs = jax.tree.leaves(r.setup.state_shardings.params)
  shapes = jax.tree.leaves(r.setup.state.params)
  kernels = sum('fsdp' in str(s.spec) and len(x.shape) >= 2 for s, x in zip(specs, shapes))
  assert kernels == 17  # 1 layer: encoder 6, decoder 10, the shared embedding
  gathers = r.collectives['all-gather']
  assert kernels + 4 <= gathers['count'] <= 2 * kernels + 4 and gathers['executions'] == gathers['count']
  text = r.compiled.as_text()
  assert text.count(' all-gather(') > gathers['count']  # async collective fusion repeats each line
  json_fields = r.to_json()
  assert {'hbm_bytes_per_chip', 'hbm_by_op_name', 'estimate_xla_bytes', 'compute_flops_per_chip'} <= set(json_fields)
  lines = '\n'.join(tpu_report.format_report(r))
  assert 'HBM traffic per chip per step, estimate' in lines and "XLA's bytes accessed as HBM traffic" in lines


@needs_libtpu
def test_per_op_estimate_lies_between_the_ceiling_and_the_floor(v5e):
  """By MFU: ceiling (perfect overlap) >= per-op >= floor (no overlap), on compiled train and eval steps; the
  per-op terms are the executed instructions' (the dots' FLOPs at least XLA's dot count of a loop-free step), and
  the JSON keeps XLA's and libtpu's own figures whole."""
  import json

  _, reports = v5e
  for program in ('train', 'eval'):
    r = reports[program]
    p, f, c = r.per_op, r.floor, r.estimate
    assert c['mfu'] >= p['mfu'] >= f['mfu'] > 0, (c['mfu'], p['mfu'], f['mfu'])
    assert f['t_step_s'] == pytest.approx(p['t_compute_s'] + p['t_hbm_s'] + p['t_ici_s'])
    assert 0 <= p['t_ici_exposed_s'] <= p['t_ici_s']
    assert p['t_hbm_s'] == pytest.approx(r.hbm_bytes_per_chip / tpu_chips.CHIPS['v5e'].hbm_bytes_per_s)
    assert 0 < p['dot_flops_per_chip'] <= r.flops_per_chip  # XLA's FLOPs add element-wise work
    assert len(r.top_ops) == 10 and sum(t for _, t in r.top_ops) <= p['t_step_s'] * (1 + 1e-9)
    assert r.libtpu_cycles['cycles'] > 0 and r.libtpu_cycles['missing_executions'] > 0
    payload = json.loads(json.dumps(r.to_json(), default=float))
    assert payload['xla_cost_analysis']['flops'] == r.flops_per_chip
    assert payload['xla_memory_analysis']['temp_size_in_bytes'] == r.memory['temporaries']
  lines = '\n'.join(tpu_report.format_report(reports['train']))
  assert 'per-op roofline' in lines and 'ceiling (perfect overlap)' in lines and 'calibrated on:' in lines


@needs_libtpu
def test_decoding_programs_compile(v5e):
  _, reports = v5e
  for program in ('eval', 'greedy', 'beam'):
    assert reports[program].fits and reports[program].memory['state'] > 0
  assert reports['greedy'].tokens_per_step == 0  # no tokens/s estimate for a while loop
  from configs import lm_tiny

  config = lm_tiny.get_config()
  config.model.update(num_layers=1, d_model=64, d_ff=128)
  config.update(max_length=32, packed_inputs_length=32, packed_targets_length=32, batch_size=8)
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  (sample,) = tpu_compile.compile_programs(config, 'v6e:2x2', programs=('sample',))
  assert sample.fits and sample.chip == 'v6e'
  assert tpu_compile.default_programs(config) == ('train', 'eval', 'sample')


@needs_libtpu
def test_multislice_keeps_fsdp_and_tensor_inside_a_slice():
  config = small_config(fsdp=2, tensor=2)
  (r,) = tpu_compile.compile_programs(config, 'v5e:2x2', num_slices=2, programs=('train',), keep_compiled=True)
  assert r.mesh == {'data': 2, 'fsdp': 2, 'tensor': 2} and r.chips == 8
  slice_of = [d.slice_index for d in r.mesh_object.devices.flat]
  assert all(len(set(np.asarray(slice_of).reshape(2, 4)[i])) == 1 for i in range(2))  # data spans the slices
  found = tpu_report.collectives(
    r.compiled.as_text(), tuple(r.mesh_object.devices.shape), r.mesh_object.axis_names, num_slices=2
  )
  inside = [c for c in found if not c.crosses_slices]
  across = [c for c in found if c.crosses_slices]
  # within a slice: fsdp and tensor only (replica groups number a slice's 4 devices); across: data only (DCN)
  assert {a for c in inside for a in c.axes} == {'fsdp', 'tensor'}
  assert across and all(c.axes == ('data',) for c in across)
  assert any(c.kind == 'all-reduce' for c in across)  # the gradient reduction over the slices
  assert r.collectives['all-reduce']['crossing_slices'] > 0


def test_state_over_hbm_is_refused_before_compiling(tmp_path):
  """Through the CLI, without JAX_PLATFORMS: the command sets it; exit 1 with the numbers, nothing compiled."""
  env = {k: v for k, v in os.environ.items() if k not in ('JAX_PLATFORMS',)}
  out = tmp_path / 'r.json'
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'transformer_jax.cli',
      'compile',
      '--config=configs/tiny.py',
      '--config.model.d_model=2048',
      '--config.model.d_ff=32768',
      '--config.model.num_layers=6',
      '--config.model.vocab_size=32768',
      '--topology=v5e-1',
      f'--json={out}',
    ],
    cwd=_REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  if importlib.util.find_spec('libtpu') is None:
    assert proc.returncode == 1 and "pip install -e '.[tpu]'" in proc.stderr
    return
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert 'does not fit' in proc.stdout and 'GiB per chip' in proc.stdout and 'compiling' not in proc.stdout
  assert '"fits": false' in out.read_text()


def test_mesh_candidates_are_compared_by_the_per_op_estimate(monkeypatch):
  """--meshes: every candidate's train step, fastest per-op first; one that does not fit is never the answer."""
  assert tpu_compile._mesh_of('data') == dict(data=-1, fsdp=1, tensor=1)
  assert tpu_compile._mesh_of('2x4x1') == dict(data=2, fsdp=4, tensor=1)
  with pytest.raises(ValueError):
    tpu_compile._mesh_of('zero')
  rng = np.random.default_rng(0)
  for _ in range(20):
    times = {'data': rng.uniform(1, 2), 'fsdp': rng.uniform(1, 2), '1x2x2': rng.uniform(0.5, 2)}
    fits = {name: bool(rng.integers(2)) for name in times}
    seen = []

    def fake(config, topology, num_slices, programs, progress, seen=seen, times=times, fits=fits):
      mesh_of = tpu_compile._mesh_of
      name = next(n for n in times if all(config.mesh[k] == v for k, v in mesh_of(n).items()))
      seen.append(name)
      r = tpu_report.ProgramReport(
        'train',
        'v5e:2x2',
        4,
        1,
        dict(config.mesh),
        'v5e',
        0.0,
        {'total': 0},
        fits[name],
        0.0,
        0.0,
        {},
        1.0,
        1,
        {'mfu': 0.5},
      )
      r.per_op = {'t_step_s': times[name], 'mfu': 0.1}
      return [r]

    monkeypatch.setattr(tpu_compile, 'compile_programs', fake)
    results = tpu_compile.compare_meshes(small_config(), 'v5e:2x2', 1, list(times))
    assert sorted(seen) == sorted(times)
    assert [t for t in (r.per_op['t_step_s'] for _, r in results)] == sorted(times.values())
    lines = tpu_compile.format_mesh_comparison(results)
    fitting = [n for n in sorted(times, key=times.get) if fits[n]]
    assert lines[-1] == (f'fastest mesh by the per-op estimate: {fitting[0]}' if fitting else 'no candidate mesh fits')
