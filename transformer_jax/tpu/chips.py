"""Published per-chip TPU figures, the roofline every ESTIMATE in `transformer-jax compile` uses, and model FLOPs.

Import these (not copies of the numbers) wherever a step time or an MFU is estimated, so all reports agree.
Nothing here touches jax: it is arithmetic on figures the compiler reported.
"""

from __future__ import annotations

import dataclasses
import math

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  device_kind: str  # jax's Device.device_kind for this chip
  peak_bf16_flops: float  # per chip, FLOP/s
  hbm_bytes: int
  hbm_bytes_per_s: float
  ici_bytes_per_s: float  # bidirectional, per chip
  cores_per_chip: int  # TensorCores: v4/v5p accelerator-type names count cores, v5e/v6e names count chips
  dims: int  # torus dimensions of the slice topology (3 for v4/v5p, 2 for v5e/v6e)
  # TensorCore clock: what libtpu's per-fusion "estimated_cycles" count in. Derived where no clock is published:
  # peak = clock x MXUs per core x MXU MACs x 2 FLOP x cores (v5e: 197e12 / (4 x 128 x 128 x 2) = 1.50 GHz).
  clock_hz: float = 0.0

  @property
  def links(self) -> int:
    """ICI links per chip: two per torus dimension (one to each neighbour)."""
    return 2 * self.dims

  @property
  def link_bytes_per_s(self) -> float:
    """One link, one direction: the bidirectional per-chip figure over links x 2 directions (v5e: 400e9 / 8 =
    50 GB/s; "How to Scale Your Model", Google DeepMind 2025, gives ~45 GB/s one-way per v5e link)."""
    return self.ici_bytes_per_s / (2 * self.links)


CHIPS = {
  # Google Cloud TPU docs, "TPU v4" (System architecture): 275 TFLOPs bf16, HBM2 32 GiB at 1200 GBps, two
  # TensorCores per chip. The page gives no per-chip ICI figure: 300 GB/s is 6 links x 50 GB/s from the TPU v4
  # paper (Jouppi et al., ISCA 2023), an assumption to check.
  # Clock: 1050 MHz (TPU v4 paper, Table 1).
  'v4': Chip('v4', 'TPU v4', 275e12, 32 * GIB, 1200e9, 300e9, 2, 3, 1.05e9),
  # Google Cloud TPU docs, "TPU v5e" (System architecture): 197 TFLOPs bf16, HBM 16 GiB at 819 GBps,
  # bidirectional ICI 400 GBps per chip, one TensorCore per chip.
  # Clock derived: 197e12 / (4 MXUs x 128 x 128 x 2) = 1.50 GHz (no published figure).
  'v5e': Chip('v5e', 'TPU v5 lite', 197e12, 16 * GIB, 819e9, 400e9, 1, 2, 1.5e9),
  # Google Cloud TPU docs, "TPU v5p" (System architecture): 459 TFLOPs bf16, HBM 95 GiB at 2765 GBps,
  # bidirectional ICI 1200 GBps per chip, two TensorCores per chip.
  # Clock derived: 459e12 / (2 cores x 4 MXUs x 128 x 128 x 2) = 1.75 GHz (no published figure).
  'v5p': Chip('v5p', 'TPU v5', 459e12, 95 * GIB, 2765e9, 1200e9, 2, 3, 1.75e9),
  # Google Cloud TPU docs, "TPU v6e" (Trillium, System architecture): 918 TFLOPs bf16, HBM 32 GB at 1638 GBps,
  # bidirectional ICI 800 GBps per chip, one TensorCore per chip. (32 GB taken as 32 GiB, as v5e's page says GiB.)
  # Clock derived: 918e12 / (2 MXUs x 256 x 256 x 2) = 3.5 GHz is implausible, so 4 MXUs of 256 x 256 at
  # 1.75 GHz is assumed (unpublished: check before trusting v6e's cycle figure).
  'v6e': Chip('v6e', 'TPU v6 lite', 918e12, 32 * GIB, 1638e9, 800e9, 1, 2, 1.75e9),
}


def roofline(chip: Chip, flops_per_chip: float, hbm_bytes_per_chip: float, ici_bytes_per_chip: float) -> dict:
  """The CEILING step time: t_step = max(flops / peak_bf16, hbm bytes / hbm_bw, ici bytes / ici_bw), per chip.

  Optimistic: it assumes the three overlap perfectly and every FLOP runs at the bf16 peak (float32 matmuls do not).
  The `compile` command passes max(XLA's FLOPs, model FLOPs / chips) (XLA counts a loop body once) and
  tpu_report.hbm_traffic's HBM estimate, and also reports it with XLA's 'bytes accessed' as HBM bytes (which counts
  VMEM-resident operands too: still a perfect-overlap figure, not a bound). The headline is
  tpu_report.per_op_times (instruction by instruction); no overlap at all is its floor.
  """
  times = {
    'compute': flops_per_chip / chip.peak_bf16_flops,
    'hbm': hbm_bytes_per_chip / chip.hbm_bytes_per_s,
    'ici': ici_bytes_per_chip / chip.ici_bytes_per_s,
  }
  bound = max(times, key=times.get)
  return {
    't_compute_s': times['compute'],
    't_hbm_s': times['hbm'],
    't_ici_s': times['ici'],
    't_step_s': times[bound],
    'bound_by': bound,
  }


# Per collective step (one hop of a ring, one exchange of a permute): "How to Scale Your Model" (Google DeepMind,
# 2025) puts ICI latency near 1 us per hop. An assumption, the same for every chip.
ICI_HOP_LATENCY_S = 1e-6


# What the per-op estimate gave for published measurements (benchmarks/tpu_calibration.py writes this line).
CALIBRATION = (
  'MaxText 16B on v5e-256: per-op 73.7% vs measured 61.10% (x1.21); MaxText 32B on v5e-256: per-op '
  '69.2% vs measured 66.86% (x1.04) [MaxText configs/v5e/README.md, 1x v5e-256]'
)


def mfu(model_flops_per_step: float, t_step_s: float, chip: Chip, chips: int) -> float:
  """Model FLOPs utilisation of an (estimated) step time: model FLOPs / (t_step * bf16 peak * chips)."""
  return model_flops_per_step / (t_step_s * chip.peak_bf16_flops * chips) if t_step_s > 0 else float('nan')


def _is_matmul_kernel(path: str, shape) -> bool:
  return len(shape) >= 2 and 'embedding' not in path


def model_flops_per_step(
  param_shapes: dict[str, tuple], model_cfg, batch: int, source_length: int, target_length: int, training: bool = True
) -> float:
  """FLOPs a step of the model needs, independent of how it is compiled (the numerator of MFU).

  Counted: 2 FLOPs per multiply-add of every matmul parameter (kernels of rank >= 2 except embedding tables)
  per token it is applied to, times 3 for training (forward + backward) = the usual 6 * params * tokens:
  - encoder kernels on source positions; decoder kernels on target positions, except the cross-attention key and
    value projections, which run on the source positions;
  - the output projection (vocab x d_model) on target positions, once, whether it is a separate kernel or the
    shared embedding table (the embedding lookups themselves are gathers: not counted);
  - attention: QK^T and AV, 2 * 2 * T_q * T_k * (heads * head_dim) per row per attention layer, counted dense
    (every T_q x T_k pair, as dense attention computes it: no causal halving, no saving from packing), times 3
    for training.
  Positions are padded positions (batch x packed length): what the step processes. Not counted: softmax,
  layer norms, biases, dropout, the loss and the optimizer (element-wise work, small next to the matmuls).
  """
  src, tgt = batch * source_length, batch * target_length
  total = 0.0
  has_projection = False
  for path, shape in param_shapes.items():
    if not _is_matmul_kernel(path, shape):
      continue
    has_projection |= 'output_projection' in path
    on_source = 'encoder' in path or ('cross_attention' in path and ('key' in path or 'value' in path))
    total += 2.0 * math.prod(shape) * (src if on_source else tgt)
  if not has_projection:  # logits through the (shared) embedding table
    total += 2.0 * model_cfg.vocab_size * model_cfg.d_model * tgt
  d_attn = model_cfg.d_model  # heads * head_dim
  layers = model_cfg.num_layers
  pairs = layers * target_length * target_length  # decoder self-attention
  if model_cfg.get('kind', 'encoder_decoder') != 'decoder':
    pairs += layers * source_length * source_length + layers * target_length * source_length
  total += 4.0 * batch * pairs * d_attn
  return total * (3.0 if training else 1.0)
