r"""Training throughput: step time, target tokens/s, model FLOPs, and MFU against the device's MEASURED peak.

    python benchmarks/train_throughput.py --config=configs/base.py \
        --config.batch_size=8 --config.packed_inputs_length=256 --config.packed_targets_length=256
    python benchmarks/train_throughput.py --config=configs/lm_tiny.py      # the decoder-only language model

One process, one compile per variant, then `--warmup` untimed steps and `--steps` timed ones (each ended by
block_until_ready; the median is reported). Variants (`--variants`, separated by ';', each a comma-separated list of
config overrides, `base` = none) run in the same process, their timed steps round-robin (step i of every variant
before step i + 1 of any), so their RATIOS share the machine's conditions; "speed vs first" is the median over
rounds of the per-round ratio:

    --variants='base;model.dtype=bfloat16;model.remat=full;model.scan_layers=True;grad_accum_steps=2'

`--compile_depths=6,24` adds a table of compile times (lower + compile of the train step from abstract shapes,
nothing allocated) for N in that list, scan_layers off and on. `--only_compile` skips the timed steps; with
`--variants` it prints each variant's compile time and XLA memory plan instead (e.g. what remat saves).

Batches are synthetic packed rows (`--data=synthetic`, no dataset needed): every row holds `--segments` examples of
random lengths filling `--fill` of its input and target slots, with segment ids and per-segment positions exactly as
data/packing.py makes them (so masks, shift-right and padding are exercised as in training). `--data=pipeline`
takes the batches from the real input pipeline of the config instead (data/pipeline.build_datasets).

MODEL FLOPs per step (counted from the architecture; matmuls only, 2 FLOPs per multiply-add). Notation: B packed
rows, S / T packed input / target row lengths (the lengths the step actually computes: attention scores cover the
whole packed row, the segment mask only discards cross-example entries), D d_model, F d_ff, N layers per side,
V vocabulary. Per row, forward:

    encoder layer   S * (8 D^2 + 4 D F)                    Q, K, V, O projections (4 * 2 D^2) and the FFN (2 * 2 D F)
                    + 4 S^2 D                              Q K^T (2 S^2 D) and A V (2 S^2 D)
    decoder layer   T * (8 D^2 + 4 D F) + 4 T^2 D          masked self-attention and FFN, as above
                    + 4 D^2 T + 4 D^2 S                    cross-attention: Q, O on the targets; K, V on the encoder
                    + 4 T S D                              cross-attention Q K^T and A V
    output          2 T D V                                pre-softmax projection over the vocabulary
    forward         N * (encoder layer + decoder layer) + output       (embeddings are gathers: 0 FLOPs)
    language model  N * (T * (8 D^2 + 4 D F) + 4 T^2 D) + 2 T D V     (model.kind='decoder': masked self-attention
                                                           and FFN only, T = packed_targets_length; no inputs)

    model FLOPs / step = 3 * B * forward                   backward = 2 x forward (grads w.r.t. activations and weights)

Causal attention is counted in full (XLA computes the masked half too), remat's recomputation is NOT counted (it is
hardware work, not model work), and the optimizer, softmax, layer norms and loss are left out (elementwise).
For comparison the table also gives XLA's own count for the compiled step (cost_analysis: every op, remat included;
a while loop's body, i.e. scanned layers or accumulated micro-batches, is counted once).

MFU = (model FLOPs / step time) / peak, where peak is MEASURED in the same run and process: a square matmul
(`--peak_size`; on CPU by default whichever of 1024/2048/4096 runs fastest here, picked once per dtype at the start, so
the reference is the best rate this machine shows) in the variant's compute dtype, on every device of the mesh at
once (a [d, n, n] batched matmul sharded over the d devices). It is timed `--peak_reps` times (after one untimed run)
before the variant's timed steps and again `--pause` seconds after every step (interleaved, so a busy shared machine
slows both alike; the pause lets the runtime finish releasing the step's buffers, CPU work
which would otherwise be charged to the matmul). Peak = total matmul FLOPs / total matmul time. Three estimates,
equal on an idle machine:
  MFU           model FLOPs / median step time / peak;
  MFU paired    the median over steps of (model FLOPs / step time) / (peak of the samples just before and after
                that step): load that drifts over seconds cancels;
  MFU best      model FLOPs / fastest step / fastest single matmul: on a shared host the nearest to an idle
                machine (a matmul can catch an idle moment that no whole step had: then it reads low);
  MFU CPU-time  (CPU only) the same ratio with both measured in this process's CPU time (time.process_time) instead
                of wall time: what other processes take from the cores cancels, and so does a step's inability to
                keep every core busy (so on an idle machine wall-clock MFU is the lower, truer figure).
On GPU/TPU the vendor's dense figure for that dtype is printed beside the measured one when the device kind is known.

Memory per device: device.memory_stats()['peak_bytes_in_use'] where the backend has it (GPU/TPU; CPU: n/a), and
XLA's compile-time plan (compiled.memory_analysis(): arguments + outputs + temporaries - aliased) on every backend.

Tokens/s counts non-pad TARGET tokens (the loss's denominator) of the global batch.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from typing import Any

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Flags are defined only when run as a script (the functions below are importable by tests)."""
  config_flags.DEFINE_config_file(
    'config', os.path.join(_REPO, 'configs', 'tiny.py'), 'Python config file; override keys with --config.key=value.'
  )
  flags.DEFINE_integer('steps', 5, 'Timed steps per variant (median reported).')
  flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
  flags.DEFINE_string('variants', 'base', "';'-separated variants, each 'key=value,key=value' or 'base'.")
  flags.DEFINE_string('compile_depths', '', "e.g. '6,24': compile-time table, scan_layers off/on.")
  flags.DEFINE_bool('only_compile', False, 'Only the compile-time table.')
  flags.DEFINE_integer(
    'peak_size', 0, 'Matmul size n for the peak (0: the fastest of 1024/2048/4096 on CPU, 8192 elsewhere).'
  )
  flags.DEFINE_integer('peak_reps', 5, 'Timed matmuls (after an untimed one) before the steps and after each step.')
  flags.DEFINE_float('pause', 0.5, 'Seconds between a step and the peak samples after it.')
  flags.DEFINE_enum('data', 'synthetic', ['synthetic', 'pipeline'], 'Where batches come from.')
  flags.DEFINE_string('workdir', None, '--data=pipeline: tokenizer cache (default runs/bench_pipeline).')
  flags.DEFINE_float('fill', 0.97, 'Synthetic rows: fraction of slots holding real tokens.')
  flags.DEFINE_integer('segments', 0, 'Synthetic rows: examples per row (0: from max_length).')
  flags.DEFINE_integer('cpu_devices', 0, 'Simulated CPU devices (0: the platform default).')


# Vendor dense peaks in TFLOP/s per device (no sparsity), by a substring of device_kind; fp32 on NVIDIA is the
# TF32 tensor-core figure (XLA's default precision for float32 matmuls there).
VENDOR_PEAK_TFLOPS = {
  'H200': {'bfloat16': 989.0, 'float16': 989.0, 'float32': 494.0},
  'H100': {'bfloat16': 989.0, 'float16': 989.0, 'float32': 494.0},  # SXM; PCIe is ~756/378
  'A100': {'bfloat16': 312.0, 'float16': 312.0, 'float32': 156.0},
  'L4': {'bfloat16': 121.0, 'float16': 121.0, 'float32': 60.0},
  'TPU v6': {'bfloat16': 918.0},
  'TPU v5p': {'bfloat16': 459.0},
  'TPU v5 lite': {'bfloat16': 197.0},
  'TPU v5e': {'bfloat16': 197.0},
  'TPU v4': {'bfloat16': 275.0},
}


# ---------------------------------------------------------------------------------------------------------------------
# FLOPs


def forward_flops_per_row(
  d_model: int, d_ff: int, num_layers: int, vocab_size: int, inputs_length: int, targets_length: int
) -> int:
  """Matmul FLOPs of one packed row's forward pass (the formula in this file's docstring)."""
  D, F, N, V, S, T = d_model, d_ff, num_layers, vocab_size, inputs_length, targets_length
  encoder_layer = S * (8 * D * D + 4 * D * F) + 4 * S * S * D
  decoder_layer = T * (8 * D * D + 4 * D * F) + 4 * T * T * D + 4 * D * D * T + 4 * D * D * S + 4 * T * S * D
  return N * (encoder_layer + decoder_layer) + 2 * T * D * V


def lm_forward_flops_per_row(d_model: int, d_ff: int, num_layers: int, vocab_size: int, targets_length: int) -> int:
  """Matmul FLOPs of one packed row's forward pass through the decoder-only language model (docstring)."""
  D, F, N, V, T = d_model, d_ff, num_layers, vocab_size, targets_length
  return N * (T * (8 * D * D + 4 * D * F) + 4 * T * T * D) + 2 * T * D * V


def is_lm(config) -> bool:
  return config.model.get('kind', 'encoder_decoder') == 'decoder'


def train_flops_per_step(config, rows: int | None = None) -> int:
  """Model FLOPs of one training step (forward + backward = 3 x forward) for config's global batch."""
  m = config.model
  rows = int(config.batch_size) if rows is None else rows
  if is_lm(config):
    return (
      3
      * rows
      * lm_forward_flops_per_row(m.d_model, m.d_ff, m.num_layers, m.vocab_size, int(config.packed_targets_length))
    )
  return (
    3
    * rows
    * forward_flops_per_row(
      m.d_model, m.d_ff, m.num_layers, m.vocab_size, int(config.packed_inputs_length), int(config.packed_targets_length)
    )
  )


def xla_flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost['flops']) if cost and 'flops' in cost else None


def closed_form_cross_entropy_sums(logits, targets, weights, label_smoothing: float):
  """A what-if for train.cross_entropy_sums (variant key `bench_loss=closed_form`): the same sums without the dense
  [tokens, V] one-hot / smoothed-label tensors and the argmax. With q = (1 - ls) one_hot + ls / V,
  -sum_v q_v log p_v = (1 - ls) nll + ls (logsumexp(z) - mean_v z_v); correct = (z_target >= max_v z) (equal to
  argmax == target except on exact ties)."""
  import jax
  import jax.numpy as jnp

  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = lse - target_logit
  loss = (1.0 - label_smoothing) * nll + label_smoothing * (lse - jnp.mean(logits, axis=-1)) if label_smoothing else nll
  correct = target_logit >= jnp.max(logits, axis=-1)
  real = weights > 0  # as train.py: a non-finite value in a padding slot must not reach the sums
  return {
    'loss_sum': jnp.sum(jnp.where(real, loss * weights, 0.0)),
    'nll_sum': jnp.sum(jnp.where(real, nll * weights, 0.0)),
    'correct_sum': jnp.sum(correct * weights),
    'weight_sum': jnp.sum(weights),
  }


# ---------------------------------------------------------------------------------------------------------------------
# Batches


def synthetic_batch(
  rows: int,
  inputs_length: int,
  targets_length: int,
  vocab_size: int,
  *,
  fill: float = 0.97,
  segments: int = 3,
  seed: int = 0,
) -> dict[str, Any]:
  """Packed rows as data/packing.py makes them: `segments` examples of random lengths per row filling `fill` of the
  slots; segment ids 1..k (0 = padding), positions restarting at 0 per example, EOS (1) ending each example."""
  import numpy as np

  rng = np.random.default_rng(seed)
  batch = {
    k: np.zeros((rows, n), np.int32)
    for k, n in (
      ('inputs', inputs_length),
      ('inputs_segmentation', inputs_length),
      ('inputs_position', inputs_length),
      ('targets', targets_length),
      ('targets_segmentation', targets_length),
      ('targets_position', targets_length),
    )
  }
  for side, length in (('inputs', inputs_length), ('targets', targets_length)):
    k = max(1, min(segments, length // 2))
    real = max(k * 2, int(round(fill * length)))
    for r in range(rows):
      cuts = np.sort(rng.choice(np.arange(1, real // 2), size=k - 1, replace=False)) * 2 if k > 1 else []
      bounds = [0, *[int(c) for c in cuts], real]
      for s in range(k):
        lo, hi = bounds[s], bounds[s + 1]
        batch[side][r, lo:hi] = rng.integers(4, vocab_size, hi - lo)
        batch[side][r, hi - 1] = 1  # EOS
        batch[f'{side}_segmentation'][r, lo:hi] = s + 1
        batch[f'{side}_position'][r, lo:hi] = np.arange(hi - lo)
  return batch


# ---------------------------------------------------------------------------------------------------------------------
# Peak


class MatmulPeak:
  """FLOP/s of an [n, n] @ [n, n] matmul on every device at once (one per device: a [d, n, n] batched matmul
  sharded over the d devices), in `dtype`. Operands are made and the matmul compiled once; sample() times it."""

  def __init__(self, dtype, devices, n: int):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    self.flops = 2.0 * len(devices) * n**3
    sharding = NamedSharding(Mesh(np.asarray(devices), ('d',)), P('d'))
    make = jax.jit(
      lambda key: jax.random.normal(key, (len(devices), n, n), jnp.float32).astype(dtype), out_shardings=sharding
    )
    self._a, self._b = make(jax.random.key(1)), make(jax.random.key(2))
    self._matmul = jax.jit(lambda x, y: jnp.einsum('dij,djk->dik', x, y), out_shardings=sharding)
    self._matmul(self._a, self._b).block_until_ready()  # compile + warm
    self.cpu_rates: list[float] = []

  def sample(self, reps: int = 1) -> list[float]:
    """FLOP/s of `reps` timed matmuls (wall clock) after one untimed one; each one's FLOPs per second of this
    process's CPU time is appended to self.cpu_rates."""
    self._matmul(self._a, self._b).block_until_ready()
    rates = []
    for _ in range(reps):
      start, cpu_start = time.perf_counter(), time.process_time()
      self._matmul(self._a, self._b).block_until_ready()
      rates.append(self.flops / (time.perf_counter() - start))
      self.cpu_rates.append(self.flops / max(time.process_time() - cpu_start, 1e-9))
    return rates


def mean_rate(rates: list[float]) -> float:
  """The rate of all these equal-work runs together (total work / total time: the harmonic mean)."""
  return len(rates) / sum(1.0 / r for r in rates)


def measure_matmul_peak(dtype, devices, n: int, reps: int = 3) -> list[float]:
  return MatmulPeak(dtype, devices, n).sample(reps)


PEAK_SIZES = (1024, 2048, 4096)  # on CPU the fastest square size varies with the cache: try these
_BEST_SIZE: dict[tuple[str, int], int] = {}


def best_peak_size(dtype, devices, sizes=PEAK_SIZES, reps: int = 5) -> int:
  """The square size whose matmul runs fastest here (over `reps` runs), once per dtype and device count; the
  peak is then the highest rate this machine shows, so MFU is not flattered by a slow reference."""
  import jax.numpy as jnp

  key = (jnp.dtype(dtype).name, len(devices))
  if key not in _BEST_SIZE:
    rates = {n: mean_rate(MatmulPeak(dtype, devices, n).sample(reps)) for n in sizes}
    _BEST_SIZE[key] = max(rates, key=rates.get)
    print(
      f'# peak size for {key[0]}: '
      + ', '.join(f'{n}: {r / 1e9:.0f} GFLOP/s' for n, r in rates.items())
      + f' -> {_BEST_SIZE[key]}',
      flush=True,
    )
  return _BEST_SIZE[key]


def vendor_peak(device, dtype_name: str) -> float | None:
  kind = getattr(device, 'device_kind', '')
  for key, peaks in VENDOR_PEAK_TFLOPS.items():
    if key.lower() in kind.lower() and dtype_name in peaks:
      return peaks[dtype_name] * 1e12
  return None


# ---------------------------------------------------------------------------------------------------------------------
# Variants


def parse_overrides(spec: str) -> list[tuple[str, str]]:
  spec = spec.strip()
  if not spec or spec == 'base':
    return []
  out = []
  for item in spec.split(','):
    key, sep, value = item.strip().partition('=')
    if not sep:
      raise ValueError(f'variant item {item!r} is not key=value')
    out.append((key.strip(), value.strip()))
  return out


def _coerce(old, value: str):
  if isinstance(old, bool):
    if value.lower() not in ('true', 'false', '1', '0'):
      raise ValueError(f'{value!r} is not a bool')
    return value.lower() in ('true', '1')
  if isinstance(old, int):
    return int(value)
  if isinstance(old, float):
    return float(value)
  return value


def apply_overrides(config, overrides: list[tuple[str, str]]):
  config = config.copy_and_resolve_references()
  with config.unlocked() if hasattr(config, 'unlocked') else _null():
    for key, value in overrides:
      node = config
      *parents, leaf = key.split('.')
      for p in parents:
        node = node[p]
      node[leaf] = _coerce(node[leaf], value) if leaf in node else value
  return config


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


@dataclasses.dataclass
class Result:
  name: str
  step_s: float
  step_times: list[float]
  tokens: float
  model_flops: float
  xla_flops: float | None
  peak: float
  peak_dtype: str
  vendor_peak: float | None
  compile_s: float
  memory_peak: float | None
  memory_plan: float | None
  loss: float
  peak_samples: list[float] = dataclasses.field(default_factory=list)
  peak_n: int = 0
  mfu_paired: float | None = None
  mfu_cpu_time: float | None = None
  xla_loops: bool = False  # scan_layers / grad_accum_steps: XLA's cost_analysis counts a loop body once
  paired_speedup: float = 1.0  # median over rounds of (first variant's step time / this one's), same round

  @property
  def achieved(self) -> float:
    return self.model_flops / self.step_s

  @property
  def mfu(self) -> float:
    return self.achieved / self.peak

  @property
  def mfu_best(self) -> float:
    """Fastest step / fastest matmul sample: on a shared host, the nearest to an idle machine (conservative when
    the matmul caught an idle moment the step never had)."""
    return self.model_flops / min(self.step_times) / max(self.peak_samples or [self.peak])

  @property
  def tokens_per_s(self) -> float:
    return self.tokens / self.step_s


def _memory_plan_bytes(compiled) -> float | None:
  try:
    m = compiled.memory_analysis()
  except Exception:
    return None
  if m is None:
    return None
  return float(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def _peak_memory(devices) -> float | None:
  values = []
  for d in devices:
    try:
      stats = d.memory_stats()
    except Exception:
      stats = None
    if stats and 'peak_bytes_in_use' in stats:
      values.append(stats['peak_bytes_in_use'])
  return float(max(values)) if values else None


def make_batch(
  config, *, data: str = 'synthetic', fill: float = 0.97, segments: int = 0, workdir: str | None = None, seed: int = 0
):
  if data == 'pipeline':
    from transformer_jax.data import pipeline

    workdir = workdir or os.path.join(_REPO, 'runs', 'bench_pipeline')
    return next(pipeline.build_datasets(config, workdir).train)
  segments = segments or max(1, int(config.packed_targets_length) // max(1, int(config.max_length) // 2))
  batch = synthetic_batch(
    int(config.batch_size),
    int(config.packed_inputs_length),
    int(config.packed_targets_length),
    int(config.model.vocab_size),
    fill=fill,
    segments=segments,
    seed=seed,
  )
  if is_lm(config):  # a language model's batch is its packed documents only
    batch = {k: v for k, v in batch.items() if k.startswith('targets')}
  return batch


class _Variant:
  """One variant's compiled step and state, its peak reference and its measurements."""

  def __init__(self, name: str, config, batch_np, mesh, *, warmup: int, peak_size: int, peak_reps: int):
    import jax
    import jax.numpy as jnp
    from flax import linen as nn
    from transformer_jax.training import optim
    from transformer_jax import parallel
    from transformer_jax.inference import evaluation
    from transformer_jax.training import train as train_lib
    from transformer_jax.training import train_state
    from transformer_jax.model.transformer import build_model

    self.name, self.config, self.mesh = name, config, mesh
    self.devices = list(mesh.devices.flat)
    self.cfg = train_state.model_config(config)
    self.dtype = jnp.dtype(self.cfg.dtype)
    self.peak_reps = peak_reps
    self.peak_size = peak_size or best_peak_size(self.dtype, self.devices)
    self.peak = MatmulPeak(self.dtype, self.devices, self.peak_size)
    self.groups = [self.peak.sample(peak_reps)]  # peak samples before the first step, then after every step
    self.times: list[float] = []
    self.cpu_times: list[float] = []
    self.rows = int(batch_np['targets'].shape[0])

    loss_what_if = config.get('bench_loss', 'train')
    if loss_what_if not in ('train', 'closed_form'):
      raise ValueError(f"bench_loss must be 'train' or 'closed_form', got {loss_what_if!r}")
    model = build_model(self.cfg)
    tx = optim.make_optimizer(config)
    self.rng = jax.random.key(int(config.seed))
    train_sums = evaluation.cross_entropy_sums
    if loss_what_if == 'closed_form':
      evaluation.cross_entropy_sums = closed_form_cross_entropy_sums  # read by make_train_step when traced
    try:
      with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
        self.state, shardings = train_state.create_sharded_state(model, tx, config, mesh, self.rng)
        self.batch = parallel.global_batch(batch_np, mesh)
        step_fn = train_lib.jit_train_step(model, tx, config, mesh, shardings)
        start = time.perf_counter()
        self.compiled = step_fn.lower(self.state, self.batch, self.rng).compile()
        self.compile_s = time.perf_counter() - start
    finally:
      evaluation.cross_entropy_sums = train_sums
    self.metrics = None
    for _ in range(warmup):
      self.state, self.metrics = self.compiled(self.state, self.batch, self.rng)
    jax.block_until_ready((self.state, self.metrics))

  def step(self, pause: float) -> None:
    import jax

    start, cpu_start = time.perf_counter(), time.process_time()
    self.state, self.metrics = self.compiled(self.state, self.batch, self.rng)
    jax.block_until_ready((self.state, self.metrics))
    self.times.append(time.perf_counter() - start)
    self.cpu_times.append(time.process_time() - cpu_start)
    time.sleep(pause)  # the runtime releases the step's buffers for a few 100 ms after it: not the matmul's time
    self.groups.append(self.peak.sample(self.peak_reps))  # interleaved: the same machine conditions as the step

  def result(self) -> Result:
    model_flops = float(train_flops_per_step(self.config, rows=self.rows))
    peaks = [r for g in self.groups for r in g]
    # step i ran between peak sample groups i and i + 1
    paired = [model_flops / t / mean_rate(self.groups[i] + self.groups[i + 1]) for i, t in enumerate(self.times)]
    cpu_mfu = None
    if self.devices[0].platform == 'cpu':
      cpu_mfu = model_flops / statistics.median(self.cpu_times) / mean_rate(self.peak.cpu_rates)
    result = Result(
      name=self.name,
      step_s=statistics.median(self.times),
      step_times=list(self.times),
      tokens=float(self.metrics['tokens']),
      model_flops=model_flops,
      xla_flops=xla_flops(self.compiled),
      peak=mean_rate(peaks),
      peak_dtype=self.dtype.name,
      vendor_peak=vendor_peak(self.devices[0], self.dtype.name),
      compile_s=self.compile_s,
      memory_peak=_peak_memory(self.devices),
      memory_plan=_memory_plan_bytes(self.compiled),
      loss=float(self.metrics['loss']),
      peak_samples=peaks,
      peak_n=self.peak_size,
      mfu_paired=statistics.median(paired) if paired else None,
      mfu_cpu_time=cpu_mfu,
      xla_loops=bool(self.cfg.scan_layers) or int(self.config.get('grad_accum_steps', 1)) > 1,
    )
    self.state = self.batch = None  # free the device memory
    return result


def run_variants(
  variants: list[tuple[str, Any]],
  batch_np,
  *,
  steps: int,
  warmup: int,
  peak_size: int,
  peak_reps: int,
  mesh=None,
  pause: float = 0.5,
) -> list[Result]:
  """Compiles every variant (name, config) and warms it up, then times them ROUND-ROBIN: step i of every variant
  runs before step i + 1 of any, so load that comes and goes on a shared machine falls on all of them alike (their
  ratios are then per-round ratios). Each step is followed by `pause` and a group of peak matmuls.

  The benchmark-only config key `bench_loss='closed_form'` (a variant override) builds that variant's step with
  closed_form_cross_entropy_sums in place of train.cross_entropy_sums: a measured what-if, not a training option."""
  from transformer_jax import parallel

  built = []
  for name, config in variants:
    variant_mesh = mesh if mesh is not None else parallel.make_mesh(config.mesh)
    built.append(
      _Variant(name, config, batch_np, variant_mesh, warmup=warmup, peak_size=peak_size, peak_reps=peak_reps)
    )
    print(f'# {name}: compiled in {built[-1].compile_s:.1f} s', flush=True)
  for _ in range(steps):
    for v in built:
      v.step(pause)
  results = []
  for v in built:
    results.append(v.result())
    rounds = [f'{t:.3f}' for t in v.times]
    print(f'# {v.name}: step times {", ".join(rounds)} s; MFU {results[-1].mfu:.1%}', flush=True)
  for r in results[1:]:
    r.paired_speedup = statistics.median(b / t for b, t in zip(results[0].step_times, r.step_times))
  return results


def run_variant(
  name: str, config, batch_np, *, steps: int, warmup: int, peak_size: int, peak_reps: int, mesh=None, pause: float = 0.5
) -> Result:
  """One variant alone (see run_variants)."""
  return run_variants(
    [(name, config)],
    batch_np,
    steps=steps,
    warmup=warmup,
    peak_size=peak_size,
    peak_reps=peak_reps,
    mesh=mesh,
    pause=pause,
  )[0]


def compile_time(config, mesh=None) -> tuple[float, float, Any]:
  """(lower seconds, compile seconds, compiled) of config's train step from abstract shapes (nothing allocated)."""
  import jax
  import jax.numpy as jnp
  from flax import linen as nn
  from transformer_jax.training import optim
  from transformer_jax import parallel
  from transformer_jax.training import train as train_lib
  from transformer_jax.training import train_state
  from transformer_jax.model.transformer import build_model

  mesh = mesh if mesh is not None else parallel.make_mesh(config.mesh)
  model = build_model(train_state.model_config(config))
  tx = optim.make_optimizer(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
    shardings = parallel.logical_shardings(train_state.state_logical_specs(model, tx, config), mesh)
    state = train_state.abstract_state(model, tx, config, shardings)
    bs = parallel.batch_sharding(mesh)
    batch = {
      k: jax.ShapeDtypeStruct((int(config.batch_size), int(config[f'packed_{side}_length'])), jnp.int32, sharding=bs)
      for k, side in (
        ('inputs', 'inputs'),
        ('targets', 'targets'),
        ('inputs_segmentation', 'inputs'),
        ('targets_segmentation', 'targets'),
        ('inputs_position', 'inputs'),
        ('targets_position', 'targets'),
      )
      if not is_lm(config) or side == 'targets'
    }
    step_fn = train_lib.jit_train_step(model, tx, config, mesh, shardings)
    start = time.perf_counter()
    lowered = step_fn.lower(state, batch, jax.random.key(0))
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    return lower_s, time.perf_counter() - start, compiled


def _temp_bytes(compiled) -> float | None:
  try:
    return float(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Report


def _g(x: float | None, scale: float = 1e9, fmt: str = '{:.1f}') -> str:
  return 'n/a' if x is None else fmt.format(x / scale)


def _pct(x: float | None) -> str:
  return 'n/a' if x is None else f'{x:.1%}'


def _mib(x: float | None) -> str:
  return 'n/a' if x is None else f'{x / 2**20:.0f} MiB'


def results_table(results: list[Result]) -> str:
  lines = [
    '| variant | step s (median) | speed vs first (per round) | target tok/s | model GFLOP/step | XLA GFLOP/step '
    '| achieved GFLOP/s | peak GFLOP/s: mean, max (measured, dtype) | MFU | MFU paired | MFU best | MFU CPU-time '
    '| vendor peak | compile s | peak mem/device | XLA plan/device | loss |',
    '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in results:
    mfu_vendor = '' if r.vendor_peak is None else f' (MFU {r.achieved / r.vendor_peak:.1%})'
    max_peak = max(r.peak_samples or [r.peak])
    lines.append(
      f'| {r.name} | {r.step_s:.3f} | {r.paired_speedup:.2f}x | {r.tokens_per_s:,.0f} | '
      f'{r.model_flops / 1e9:.1f} | {_g(r.xla_flops)}{"*" if r.xla_loops else ""} | {r.achieved / 1e9:.1f} | '
      f'{r.peak / 1e9:.0f}, {max_peak / 1e9:.0f} ({r.peak_dtype}, n={r.peak_n}) | **{r.mfu:.1%}** | '
      f'{_pct(r.mfu_paired)} | {r.mfu_best:.1%} | {_pct(r.mfu_cpu_time)} | '
      f'{_g(r.vendor_peak, 1e12, "{:.0f} TFLOP/s")}{mfu_vendor} | '
      f'{r.compile_s:.1f} | {_mib(r.memory_peak)} | {_mib(r.memory_plan)} | {r.loss:.4f} |'
    )
  if any(r.xla_loops for r in results):
    lines.append(
      "\n\\* XLA's cost_analysis counts a while-loop body once (scanned layers: one layer; gradient "
      'accumulation: one micro-batch).'
    )
  return '\n'.join(lines)


def _command() -> str:
  return 'python ' + ' '.join(
    a if ' ' not in a and ';' not in a else repr(a) for a in [os.path.relpath(sys.argv[0], os.getcwd())] + sys.argv[1:]
  )


def main(argv):
  del argv
  if FLAGS.cpu_devices:
    import jax

    jax.config.update('jax_num_cpu_devices', FLAGS.cpu_devices)
  import jax
  from transformer_jax import parallel

  config = FLAGS.config
  mesh = parallel.make_mesh(config.mesh)
  device = jax.devices()[0]
  peak_size = FLAGS.peak_size or (0 if device.platform == 'cpu' else 8192)
  print(f'# command: {_command()}')
  print(
    f'# device: {jax.device_count()} x {device.platform} {getattr(device, "device_kind", "")}, '
    f'mesh {dict(mesh.shape)}, jax {jax.__version__}, {time.strftime("%Y-%m-%d %H:%M")}, '
    f'os.cpu_count()={os.cpu_count()}'
  )
  m = config.model
  lengths = (
    f'{config.packed_targets_length} tokens (decoder-only LM)'
    if is_lm(config)
    else f'{config.packed_inputs_length}/{config.packed_targets_length} tokens'
  )
  print(
    f'# model: N={m.num_layers} D={m.d_model} F={m.d_ff} h={m.num_heads} V={m.vocab_size}; batch '
    f'{config.batch_size} rows x {lengths}; '
    f'data={FLAGS.data}; peak: {peak_size or "fastest of " + "/".join(map(str, PEAK_SIZES))}^3 matmul '
    f'x{FLAGS.peak_reps} before the steps and after each',
    flush=True,
  )

  if FLAGS.only_compile and FLAGS.variants.strip() != 'base':
    rows = [
      '| variant | compile s | XLA temporaries/device | XLA plan/device (args + outputs + temps - aliased) |',
      '|---|---|---|---|',
    ]
    for spec in FLAGS.variants.split(';'):
      lower_s, compile_s, compiled = compile_time(apply_overrides(config, parse_overrides(spec)), mesh)
      rows.append(
        f'| {spec.strip() or "base"} | {lower_s + compile_s:.1f} | {_mib(_temp_bytes(compiled))} | '
        f'{_mib(_memory_plan_bytes(compiled))} |'
      )
      print(f'# {spec.strip()}: compile {lower_s + compile_s:.1f} s', flush=True)
    print()
    print('\n'.join(rows))
    print(flush=True)

  if not FLAGS.only_compile:
    batch_np = make_batch(
      config, data=FLAGS.data, fill=FLAGS.fill, segments=FLAGS.segments, workdir=FLAGS.workdir, seed=int(config.seed)
    )
    real_targets = float((batch_np['targets'] != 0).sum()) / batch_np['targets'].size
    real_inputs = (
      f'{float((batch_np["inputs"] != 0).sum()) / batch_np["inputs"].size:.3f}' if 'inputs' in batch_np else 'none (LM)'
    )
    print(
      f'# batch: real target slots {real_targets:.3f}, real input slots {real_inputs}, '
      f'{int(batch_np["targets_segmentation"].max())} examples max per row',
      flush=True,
    )
    variants = [
      (spec.strip() or 'base', apply_overrides(config, parse_overrides(spec))) for spec in FLAGS.variants.split(';')
    ]
    results = run_variants(
      variants,
      batch_np,
      steps=FLAGS.steps,
      warmup=FLAGS.warmup,
      peak_size=peak_size,
      peak_reps=FLAGS.peak_reps,
      mesh=mesh,
      pause=FLAGS.pause,
    )
    print()
    print(results_table(results))
    print(flush=True)

  if FLAGS.compile_depths:
    rows = [
      '| N (layers per side) | scan_layers | lower s | compile s | total s | XLA temporaries/device |',
      '|---|---|---|---|---|---|',
    ]
    for depth in [int(d) for d in FLAGS.compile_depths.split(',') if d.strip()]:
      for scan in (False, True):
        variant = apply_overrides(config, [('model.num_layers', str(depth)), ('model.scan_layers', str(scan))])
        lower_s, compile_s, compiled = compile_time(variant, mesh)
        rows.append(
          f'| {depth} | {scan} | {lower_s:.1f} | {compile_s:.1f} | {lower_s + compile_s:.1f} | '
          f'{_mib(_temp_bytes(compiled))} |'
        )
        del compiled
        print(f'# compile N={depth} scan_layers={scan}: lower {lower_s:.1f} s, compile {compile_s:.1f} s', flush=True)
    print()
    print('\n'.join(rows))


if __name__ == '__main__':
  from transformer_jax import hugepages

  hugepages.reexec_if_wanted(one_heap=True)  # as the CLI's `train` does: XLA's step buffers on one heap, huge pages
  define_flags()
  app.run(main)
