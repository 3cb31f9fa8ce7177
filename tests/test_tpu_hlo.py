"""tpu_report's reading of TPU HLO text (HBM traffic estimate, logical collectives) on small hand-written modules in
the syntax libtpu prints: no compiler, no jax."""

import pytest

from transformer_jax.tpu import chips as tpu_chips
from transformer_jax.tpu import report as tpu_report

MIB = 2**20

# f32[512,512] = 1 MiB; bf16[512,512] = 0.5 MiB. T(8,128) tiles: no padding at these sizes.
_LOOP = """HloModule jit_step, entry_computation_layout={(f32[512,512]{1,0})->f32[512,512]{1,0}}

%fused_computation.1 (param_0.1: f32[512,512]) -> f32[512,512] {
  %param_0.1 = f32[512,512]{1,0:T(8,128)S(1)} parameter(0)
  ROOT %negate.1 = f32[512,512]{1,0:T(8,128)S(1)} negate(%param_0.1)
}

%body.1 (wide.param.1: (s32[], f32[512,512])) -> (s32[], f32[512,512]) {
  %wide.param.1 = (s32[]{:T(128)}, f32[512,512]{1,0:T(8,128)}) parameter(0)
  %get-tuple-element.1 = s32[]{:T(128)} get-tuple-element(%wide.param.1), index=0
  %get-tuple-element.2 = f32[512,512]{1,0:T(8,128)} get-tuple-element(%wide.param.1), index=1
  %fusion.1 = f32[512,512]{1,0:T(8,128)} fusion(%get-tuple-element.2), kind=kLoop, calls=%fused_computation.1, metadata={op_name="jit(step)/loop/negate"}
  %collective-permute-start.1 = (f32[512,512]{1,0:T(8,128)S(1)}, f32[512,512]{1,0:T(8,128)S(1)}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%fusion.1), channel_id=7, source_target_pairs={{0,1},{1,2},{2,3},{3,0}}
  %collective-permute-done.1 = f32[512,512]{1,0:T(8,128)S(1)} collective-permute-done(%collective-permute-start.1)
  %constant.1 = s32[]{:T(128)} constant(1)
  %add.1 = s32[]{:T(128)} add(%get-tuple-element.1, %constant.1)
  ROOT %tuple.1 = (s32[]{:T(128)}, f32[512,512]{1,0:T(8,128)}) tuple(%add.1, %fusion.1)
}

%cond.1 (wide.param.2: (s32[], f32[512,512])) -> pred[] {
  %wide.param.2 = (s32[]{:T(128)}, f32[512,512]{1,0:T(8,128)}) parameter(0)
  %constant.2 = s32[]{:T(128)} constant(%TRIP)
  %get-tuple-element.3 = s32[]{:T(128)} get-tuple-element(%wide.param.2), index=0
  ROOT %compare.1 = pred[]{:T(512)} compare(%get-tuple-element.3, %constant.2), direction=LT
}

ENTRY %main.1 (param.1: f32[512,512]) -> f32[512,512] {
  %param.1 = f32[512,512]{1,0:T(8,128)} parameter(0)
  %constant.3 = s32[]{:T(128)} constant(0)
  %tuple.2 = (s32[]{:T(128)}, f32[512,512]{1,0:T(8,128)}) tuple(%constant.3, %param.1)
  %while.1 = (s32[]{:T(128)}, f32[512,512]{1,0:T(8,128)}) while(%tuple.2), condition=%cond.1, body=%body.1%BACKEND
  ROOT %get-tuple-element.4 = f32[512,512]{1,0:T(8,128)} get-tuple-element(%while.1), index=1
}
"""


def loop_module(trip: int, known: bool = False) -> str:
  backend = f', backend_config={{"known_trip_count":{{"n":"{trip}"}}}}' if known else ''
  return _LOOP.replace('%TRIP', str(99 if known else trip)).replace('%BACKEND', backend)


@pytest.mark.parametrize('known', [False, True])
def test_loop_bodies_count_times_their_trip_count(known):
  """Per iteration the body's fusion reads 1 MiB and writes 1 MiB of HBM, and the permute reads that 1 MiB (its
  own buffers are in VMEM); the loop counter's scalars add a few bytes. known_trip_count wins over the condition's
  constant."""
  for trip in (1, 8):
    h = tpu_report.hbm_traffic(loop_module(trip, known))
    assert h.bytes == pytest.approx(trip * 3 * MIB, abs=30 * trip) and h.unknown_trip_counts == 0
    assert h.by_op_name['loop/negate'] == trip * 2 * MIB and h.by_op_name['collective-permute-start'] == trip * MIB
  computations, entry = tpu_report.parse_hlo(loop_module(8, known))
  graph = tpu_report.call_graph(computations, entry)
  assert graph.runs['%body.1'] == 8 and graph.control == {'%main.1', '%body.1', '%cond.1'}


def test_a_loop_of_unknown_trip_count_counts_once_and_says_so():
  text = loop_module(8).replace('direction=LT', 'direction=NE')
  h = tpu_report.hbm_traffic(text)
  assert h.bytes == pytest.approx(3 * MIB, abs=30) and h.unknown_trip_counts == 1


def test_a_collective_in_a_loop_is_one_op_run_trip_count_times():
  found = tpu_report.collectives(loop_module(8), (4,), ('fsdp',))
  assert len(found) == 1
  (c,) = found
  assert (c.kind, c.channel_id, c.executions, c.group_size, c.bytes) == ('collective-permute', 7, 8, 2, MIB)
  s = tpu_report.summarize(found)['collective-permute']
  assert (s['count'], s['executions'], s['bytes'], s['ici_bytes']) == (1, 8, MIB, 8 * MIB)


_ASYNC = """HloModule jit_step

%fused_computation.1 (param_0.1: bf16[64,512]) -> (bf16[64,512], bf16[512,512], s32[2]) {
  %param_0.1 = bf16[64,512]{1,0:T(8,128)(2,1)S(1)} parameter(0)
  %all-gather.1 = bf16[512,512]{1,0:T(8,128)(2,1)} all-gather(%param_0.1), channel_id=3, replica_groups=[1,8]<=[8], dimensions={0}, use_global_device_ids=true
  ROOT %custom-call.1 = (bf16[64,512]{1,0:T(8,128)(2,1)S(1)}, bf16[512,512]{1,0:T(8,128)(2,1)S(1)}, s32[2]{0:S(4)}) custom-call(%all-gather.1), custom_call_target="AsyncCollectiveStart"
}

%fused_computation.2 (param_0.2: bf16[64,512], param_1.2: bf16[512,512]) -> (bf16[64,512], bf16[512,512]) {
  %param_0.2 = bf16[64,512]{1,0:T(8,128)(2,1)S(1)} parameter(0)
  %param_1.2 = bf16[512,512]{1,0:T(8,128)(2,1)S(1)} parameter(1)
  %all-gather.2 = bf16[512,512]{1,0:T(8,128)(2,1)} all-gather(%param_0.2), channel_id=3, replica_groups=[1,8]<=[8], dimensions={0}, use_global_device_ids=true
  ROOT %tuple.9 = (bf16[64,512]{1,0:T(8,128)(2,1)S(1)}, bf16[512,512]{1,0:T(8,128)(2,1)S(1)}) tuple(%param_0.2, %all-gather.2)
}

ENTRY %main.2 (param.1: f32[512,512], param.2: bf16[64,512]) -> f32[512,512] {
  %param.1 = f32[512,512]{1,0:T(8,128)} parameter(0)
  %param.2 = bf16[64,512]{1,0:T(8,128)(2,1)S(1)} parameter(1)
  %copy-start.1 = (f32[512,512]{1,0:T(8,128)S(1)}, f32[512,512]{1,0:T(8,128)}, u32[]{:S(2)}) copy-start(%param.1)
  %copy-done.1 = f32[512,512]{1,0:T(8,128)S(1)} copy-done(%copy-start.1)
  %fusion.1 = (bf16[64,512]{1,0:T(8,128)(2,1)S(1)}, bf16[512,512]{1,0:T(8,128)(2,1)S(1)}, s32[2]{0:S(4)}) fusion(%param.2), kind=kOutput, calls=%fused_computation.1
  %fusion.2 = (bf16[64,512]{1,0:T(8,128)(2,1)S(1)}, bf16[512,512]{1,0:T(8,128)(2,1)S(1)}) fusion(%param.2, %fusion.1), kind=kOutput, calls=%fused_computation.2
  %negate.1 = f32[512,512]{1,0:T(8,128)S(1)} negate(%copy-done.1)
  %copy-start.2 = (f32[512,512]{1,0:T(8,128)}, f32[512,512]{1,0:T(8,128)S(1)}, u32[]{:S(2)}) copy-start(%negate.1)
  %copy-done.2 = f32[512,512]{1,0:T(8,128)} copy-done(%copy-start.2)
  %slice-start.1 = ((f32[512,512]{1,0:T(8,128)}), f32[128,512]{1,0:T(8,128)S(1)}, s32[]{:S(2)}) slice-start(%copy-done.2), slice={[0:128], [0:512]}
  %slice-done.1 = f32[128,512]{1,0:T(8,128)S(1)} slice-done(%slice-start.1)
  ROOT %copy.1 = f32[512,512]{1,0:T(8,128)} copy(%copy-done.2)
}
"""


def test_async_copies_count_once_and_vmem_buffers_not_at_all():
  """Prefetch HBM->VMEM 1 MiB, compute in VMEM (0), evict VMEM->HBM 1 MiB, slice a quarter into VMEM 0.25 MiB,
  an HBM->HBM copy 2 MiB; the gather's fusions work in VMEM (S(1)) only."""
  h = tpu_report.hbm_traffic(_ASYNC)
  assert h.bytes == (1 + 1 + 0.25 + 2) * MIB
  assert h.by_op_name == {'copy-start': 2 * MIB, 'slice-start': 0.25 * MIB, 'copy': 2 * MIB}


def test_one_collective_per_channel_id():
  """Async collective fusion repeats the all-gather line in each fusion that advances it: one collective."""
  found = tpu_report.collectives(_ASYNC, (8,), ('fsdp',))
  assert [(c.kind, c.channel_id, c.executions, c.bytes, c.axes) for c in found] == [
    ('all-gather', 3, 1, MIB // 2, ('fsdp',))
  ]
  assert tpu_report.summarize(found)['all-gather']['count'] == 1


def test_tiled_layouts_pad_their_minor_dimensions():
  """bf16[100,64] with T(8,128) on layout {1,0}: 104 x 128 stored; on {0,1} (dim 0 minor): 128 x 64."""
  assert tpu_report.hbm_arrays_bytes('bf16[100,64]{1,0:T(8,128)(2,1)}') == 104 * 128 * 2
  assert tpu_report.hbm_arrays_bytes('bf16[100,64]{0,1:T(8,128)(2,1)}') == 128 * 64 * 2
  assert tpu_report.hbm_arrays_bytes('f32[1000]{0:T(1024)}') == 4096
  assert tpu_report.hbm_arrays_bytes('bf16[100,64]{1,0:T(8,128)(2,1)S(1)}') == 0
  assert tpu_report.hbm_arrays_bytes('(f32[8]{0}, s32[]{:S(2)}, u32[4]{0:S(0)})') == 32 + 16


# ---------------------------------------------------------------------------------------------------------------------
# Per-operation roofline: the value worked out by hand on each module

V5E = tpu_chips.CHIPS['v5e']
_PERMUTE_S = MIB / V5E.link_bytes_per_s + tpu_chips.ICI_HOP_LATENCY_S  # 1 MiB to one neighbour, one hop

_DOT = """HloModule jit_step

%fused_computation.7 (param_0.7: bf16[1024,2048], param_1.7: bf16[2048,1024]) -> f32[1024,1024] {
  %param_0.7 = bf16[1024,2048]{1,0:T(8,128)(2,1)S(1)} parameter(0)
  %param_1.7 = bf16[2048,1024]{1,0:T(8,128)(2,1)} parameter(1)
  %dot.7 = f32[1024,1024]{1,0:T(8,128)S(1)} dot(%param_0.7, %param_1.7), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %negate.7 = f32[1024,1024]{1,0:T(8,128)S(1)} negate(%dot.7)
}

ENTRY %main.7 (param.1: bf16[1024,2048], param.2: bf16[2048,1024]) -> f32[1024,1024] {
  %param.1 = bf16[1024,2048]{1,0:T(8,128)(2,1)S(1)} parameter(0)
  %param.2 = bf16[2048,1024]{1,0:T(8,128)(2,1)} parameter(1)
  ROOT %fusion.7 = f32[1024,1024]{1,0:T(8,128)S(1)} fusion(%param.1, %param.2), kind=kOutput, calls=%fused_computation.7, metadata={op_name="jit(step)/mlp/dot_general"}, backend_config={"window_config":{"estimated_cycles":"30000"}}
}
"""


def test_a_fusion_is_charged_the_dot_inside_it():
  """2 x 1024 x 1024 x 2048 FLOPs inside the fusion (21.8 us at 197 TFLOP/s) against its one HBM operand, the
  4 MiB right-hand side (5.1 us): compute-bound. libtpu's cycles: 30000 at 1.5 GHz = 20 us."""
  p = tpu_report.per_op_times(_DOT, V5E, (1,), ('fsdp',))
  flops = 2 * 1024 * 1024 * 2048
  assert p.dot_flops == flops
  assert p.t_per_op_s == pytest.approx(flops / V5E.peak_bf16_flops)
  assert p.t_hbm_s == pytest.approx(4 * MIB / V5E.hbm_bytes_per_s)
  assert p.t_floor_s == pytest.approx(flops / V5E.peak_bf16_flops + 4 * MIB / V5E.hbm_bytes_per_s)
  assert p.top == [('mlp/dot_general', pytest.approx(p.t_per_op_s))]
  assert p.cycles == 30000 and p.cycles_missing == 0 and p.executed == 1
  # with the right-hand side in VMEM too, nothing is read from HBM; with the result in HBM, 4 MiB more is written
  assert tpu_report.per_op_times(_DOT.replace('(2,1)}', '(2,1)S(1)}'), V5E, (1,), ('fsdp',)).t_hbm_s == 0
  slow = tpu_report.per_op_times(
    _DOT.replace('f32[1024,1024]{1,0:T(8,128)S(1)} fusion', 'f32[1024,1024]{1,0:T(8,128)} fusion'), V5E, (1,), ('fsdp',)
  )
  assert slow.t_hbm_s == pytest.approx(8 * MIB / V5E.hbm_bytes_per_s)


def test_a_loop_body_counts_trip_count_times_and_an_async_collective_with_nothing_between_is_exposed():
  """Per iteration: the fusion reads and writes 1 MiB (2 MiB of HBM), the permute's start reads its 1 MiB
  operand, and the permute (1 MiB to one neighbour over one link) has nothing between its start and done."""
  for trip in (1, 8):
    p = tpu_report.per_op_times(loop_module(trip, known=True), V5E, (4,), ('fsdp',))
    hbm = 3 * MIB / V5E.hbm_bytes_per_s
    assert p.t_ici_s == pytest.approx(trip * _PERMUTE_S) and p.t_ici_exposed_s == pytest.approx(trip * _PERMUTE_S)
    assert p.t_per_op_s == pytest.approx(trip * (hbm + _PERMUTE_S), rel=1e-4)
    assert p.t_floor_s == pytest.approx(p.t_per_op_s)  # no FLOPs, nothing hidden: the floor is the same sum
    # fusion, permute start, the counter's add and the condition's compare: none carries a cycle count
    assert p.cycles == 0 and p.cycles_missing == p.executed == trip * 4


def test_work_between_start_and_done_hides_that_much_of_the_collective():
  """The same loop with the fusion moved between the permute's start and done: its 2 MiB of HBM time is taken
  off the permute's time; the floor still charges both."""
  text = loop_module(8, known=True)
  lines = text.splitlines()
  fusion = next(i for i, line in enumerate(lines) if '%fusion.1 = ' in line)
  start = fusion + 1
  lines[fusion], lines[start] = lines[start].replace('(%fusion.1)', '(%get-tuple-element.2)'), lines[fusion]
  p = tpu_report.per_op_times('\n'.join(lines), V5E, (4,), ('fsdp',))
  fusion_s, start_s = 2 * MIB / V5E.hbm_bytes_per_s, MIB / V5E.hbm_bytes_per_s
  assert p.t_ici_exposed_s == pytest.approx(8 * (_PERMUTE_S - fusion_s), rel=1e-4)
  assert p.t_per_op_s == pytest.approx(8 * (fusion_s + start_s + _PERMUTE_S - fusion_s), rel=1e-4)
  assert p.t_floor_s == pytest.approx(8 * (fusion_s + start_s + _PERMUTE_S), rel=1e-4)
  # a permute of 4 KiB (1.1 us) hides entirely behind the 2.6 us fusion: nothing exposed, never less than zero
  small = '\n'.join(lines).replace(
    'f32[512,512]{1,0:T(8,128)S(1)}, f32[512,512]{1,0:T(8,128)S(1)}, u32',
    'f32[8,128]{1,0:T(8,128)S(1)}, f32[8,128]{1,0:T(8,128)S(1)}, u32',
  )
  hidden = tpu_report.per_op_times(small, V5E, (4,), ('fsdp',))
  assert hidden.t_ici_s == pytest.approx(8 * (4096 / V5E.link_bytes_per_s + tpu_chips.ICI_HOP_LATENCY_S))
  assert hidden.t_ici_exposed_s == 0
  assert hidden.t_per_op_s == pytest.approx(8 * (fusion_s + start_s), rel=1e-4)


def test_async_collective_fusion_is_one_collective_from_its_first_to_its_last_fusion():
  """TPU's async collective fusion in _ASYNC: the all-gather (bf16[512,512] over 8 devices) starts in fusion.1 and
  finishes in fusion.2, with nothing between: a ring over two links, 7/8 of 0.5 MiB sent, 7 hops. The negate
  between the copies is VMEM-only work (0 s): no FLOPs, and copies count as HBM."""
  p = tpu_report.per_op_times(_ASYNC, V5E, (8,), ('fsdp',))
  gather_s = 7 / 8 * MIB / 2 / (2 * V5E.link_bytes_per_s) + 7 * tpu_chips.ICI_HOP_LATENCY_S
  assert p.t_ici_s == pytest.approx(gather_s) and p.t_ici_exposed_s == pytest.approx(gather_s)
  hbm = tpu_report.hbm_traffic(_ASYNC).bytes / V5E.hbm_bytes_per_s
  assert p.t_per_op_s == pytest.approx(hbm + gather_s)
  assert dict(p.top)['all-gather all-gather'] == pytest.approx(gather_s)
  # on a 2x4 slice the 8-chip group spans both dimensions: four links, the same hops
  wide = tpu_report.per_op_times(_ASYNC, V5E, (8,), ('fsdp',), torus=(2, 4))
  assert wide.t_ici_s == pytest.approx(gather_s - 7 / 8 * MIB / 2 / (4 * V5E.link_bytes_per_s))


@pytest.mark.parametrize(
  'group, torus, spanned',
  [
    (4, (4, 4), 1),
    (16, (4, 4), 2),
    (8, (2, 4), 2),
    (2, (2, 2, 1), 1),
    (8, (2, 2, 2), 3),
    (5, None, 1),
    (1, (16, 16), 1),
  ],
)
def test_a_group_spans_the_torus_dimensions_it_needs(group, torus, spanned):
  assert tpu_report.torus_dims_spanned(group, torus) == spanned


_SCAN = """HloModule jit_step

%fused_computation.3 (param_0.3: f32[8,512,512], param_1.3: f32[512,512], param_2.3: s32[]) -> f32[8,512,512] {
  %param_0.3 = f32[8,512,512]{2,1,0:T(8,128)} parameter(0)
  %param_1.3 = f32[512,512]{1,0:T(8,128)} parameter(1)
  %bitcast.3 = f32[1,512,512]{2,1,0:T(8,128)} bitcast(%param_1.3)
  %param_2.3 = s32[]{:T(128)S(6)} parameter(2)
  %constant.3 = s32[]{:T(128)} constant(0)
  ROOT %dynamic-update-slice.3 = f32[8,512,512]{2,1,0:T(8,128)} dynamic-update-slice(%param_0.3, %bitcast.3, %param_2.3, %constant.3, %constant.3)
}

%fused_computation.4 (param_0.4: f32[8,512,512], param_1.4: s32[]) -> f32[512,512] {
  %param_0.4 = f32[8,512,512]{2,1,0:T(8,128)} parameter(0)
  %param_1.4 = s32[]{:T(128)S(6)} parameter(1)
  %constant.4 = s32[]{:T(128)} constant(0)
  %dynamic-slice.4 = f32[1,512,512]{2,1,0:T(8,128)} dynamic-slice(%param_0.4, %param_1.4, %constant.4, %constant.4), dynamic_slice_sizes={1,512,512}
  %bitcast.5 = f32[512,512]{1,0:T(8,128)} bitcast(%dynamic-slice.4)
  ROOT %negate.4 = f32[512,512]{1,0:T(8,128)S(1)} negate(%bitcast.5)
}

ENTRY %main.3 (param.1: f32[8,512,512], param.2: f32[512,512], param.3: s32[]) -> f32[8,512,512] {
  %param.1 = f32[8,512,512]{2,1,0:T(8,128)} parameter(0)
  %param.2 = f32[512,512]{1,0:T(8,128)} parameter(1)
  %param.3 = s32[]{:T(128)S(6)} parameter(2)
  %fusion.4 = f32[512,512]{1,0:T(8,128)S(1)} fusion(%param.1, %param.3), kind=kLoop, calls=%fused_computation.4
  ROOT %fusion.3 = f32[8,512,512]{2,1,0:T(8,128)} fusion(%param.1, %param.2, %param.3), kind=kLoop, calls=%fused_computation.3
}
"""


def test_a_scan_touches_one_layer_of_a_stacked_buffer():
  """The in-place update of one 1 MiB layer of an 8 MiB stacked buffer reads the 1 MiB update and writes 1 MiB
  (not 8 + 8 + 1); reading one layer through a dynamic-slice reads 1 MiB (not 8), into VMEM."""
  h = tpu_report.hbm_traffic(_SCAN)
  assert h.bytes == 3 * MIB
  p = tpu_report.per_op_times(_SCAN, V5E, (1,), ('fsdp',))
  assert p.t_hbm_s == pytest.approx(3 * MIB / V5E.hbm_bytes_per_s)
  # the same fusions reading their whole operand (an element-wise user, not a dynamic-slice) pay for all of it
  whole = _SCAN.replace('dynamic-slice(%param_0.4', 'dynamic-slice(%negate.0').replace(
    '%dynamic-slice.4 =', '%negate.0 = f32[8,512,512]{2,1,0:T(8,128)} negate(%param_0.4)\n  %dynamic-slice.4 ='
  )
  assert tpu_report.hbm_traffic(whole).bytes == (8 + 2) * MIB
