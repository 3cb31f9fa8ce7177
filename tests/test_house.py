"""The house rules: no import cycles in transformer_jax/, the model knows nothing of files, and a workdir written by
an earlier version of the code (tests/data/workdir_v1) still loads unchanged."""

import ast
import functools
import gc
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, 'transformer_jax')
DATA = os.path.join(REPO, 'tests', 'data')


def _modules() -> dict[str, str]:
  out = {}
  for root, _, names in os.walk(PACKAGE):
    for name in names:
      if name.endswith('.py'):
        rel = os.path.relpath(os.path.join(root, name), REPO)[:-3].replace(os.sep, '.')
        out[rel[: -len('.__init__')] if rel.endswith('.__init__') else rel] = os.path.join(root, name)
  return out


def _parse(path: str) -> ast.AST:
  # No garbage collection while CPython 3.11 builds the tree: a finalizer run inside it (an orbax asyncio task left
  # by another test in this worker) upsets the AST constructor's recursion count ("AST constructor recursion depth
  # mismatch", SystemError).
  gc.disable()
  try:
    with open(path) as f:
      return ast.parse(f.read())
  finally:
    gc.enable()


def import_graph() -> dict[str, set[str]]:
  """module -> project modules it imports (at any level: a function-level import is still an edge). Read once per
  test process (the sources do not change during a run); each caller gets its own copy."""
  return {m: set(deps) for m, deps in _import_graph().items()}


@functools.cache
def _import_graph() -> dict[str, frozenset[str]]:
  modules = _modules()
  graph = {m: set() for m in modules}
  for module, path in modules.items():
    for node in ast.walk(_parse(path)):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        # `from pkg import sub` depends on pkg.sub when that is a module, else on pkg itself.
        names = [f'{node.module}.{a.name}' if f'{node.module}.{a.name}' in modules else node.module for a in node.names]
      else:
        continue
      for name in names:
        while name and name not in modules:
          name = name.rpartition('.')[0]
        # A package's __init__ importing its own submodules is how packages work, not a cycle.
        if name and name != module and not name.startswith(module + '.'):
          graph[module].add(name)
  return {m: frozenset(deps) for m, deps in graph.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(node):
    state[node] = 1
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return stack[stack.index(nxt) :] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, list[str]]:
  """Every module `start` imports directly or through others -> one import path to it (start first)."""
  paths = {start: [start]}
  todo = [start]
  while todo:
    node = todo.pop()
    for nxt in sorted(graph.get(node, ())):
      if nxt not in paths:
        paths[nxt] = paths[node] + [nxt]
        todo.append(nxt)
  del paths[start]
  return paths


def test_reachable_follows_imports_through_other_modules():
  graph = {'a': {'b'}, 'b': {'c'}, 'c': {'a', 'd'}, 'e': {'a'}}
  assert reachable(graph, 'a') == {'b': ['a', 'b'], 'c': ['a', 'b', 'c'], 'd': ['a', 'b', 'c', 'd']}
  assert reachable(graph, 'd') == {}


def test_cycle_finder_has_teeth():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': set()}) is None


def test_no_import_cycles():
  graph = import_graph()
  assert 'transformer_jax.inference.workdir' in graph and graph['transformer_jax.commands']  # the graph was really read
  assert find_cycle(graph) is None, ' -> '.join(find_cycle(graph))


def test_only_the_cli_and_the_compile_check_import_the_trainer():
  """Read-only tools (evaluate, translate, export, attention maps) reach evaluation.py, not the train step's module."""
  graph = import_graph()
  importers = {m for m, deps in graph.items() if 'transformer_jax.training.train' in deps}
  assert importers == {'transformer_jax.commands', 'transformer_jax.tpu.compile'}, sorted(importers)


# The lower layers and everything each may reach (directly or through others): storage/ names where a run lives,
# model/ is the network, data/ feeds it; none of them may climb to what trains, decodes or exports.
LAYERS = {
  'storage': {'errors'},
  'model': {'errors', 'parallel'},
  'data': {'errors', 'parallel', 'model', 'storage'},
}


def test_the_lower_layers_never_climb():
  graph = import_graph()
  for layer, allowed in LAYERS.items():
    modules = [m for m in graph if m.startswith(f'transformer_jax.{layer}.')]
    assert len(modules) >= 3, (layer, modules)  # the graph was really read
    for module in modules:
      above = {m: p for m, p in reachable(graph, module).items() if m.split('.')[1] not in allowed | {layer}}
      assert not above, ' -> '.join(next(iter(above.values())))


def test_model_does_not_import_the_data_package():
  """Not directly, and not through another module: the model, decoding and the vocabulary run without files."""
  graph = import_graph()
  for module in (
    'transformer_jax.model.transformer',
    'transformer_jax.inference.decode',
    'transformer_jax.model.vocab',
  ):
    assert graph[module] or module == 'transformer_jax.model.vocab', module  # the graph was really read
    data = {m: path for m, path in reachable(graph, module).items() if m.startswith('transformer_jax.data')}
    assert not data, ' -> '.join(next(iter(data.values())))


def test_every_module_imports_alone_in_a_fresh_interpreter():
  """Each module imports on its own (dependency order is Python's): a cycle hidden behind import order fails here."""
  script = (
    'import importlib, sys\n'
    f'for name in {sorted(_modules())!r}:\n'
    '  for m in [k for k in sys.modules if k.startswith("transformer_jax")]:\n'
    '    del sys.modules[m]\n'
    '  importlib.import_module(name)\n'
    'print("ok")\n'
  )
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, cwd=REPO, timeout=300)
  assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr[-2000:]


def test_old_workdir_loads_unchanged(tmp_path):
  """tests/data/workdir_v1 is a 2-step workdir written by an earlier version of the code, with its parameters as that
  version exported them (workdir_v1_params.safetensors) and its greedy translations of two sentences
  (workdir_v1_greedy.txt). The current parameters-only restore gives the same parameters bit for bit, and the same
  translations."""
  from transformer_jax import export
  from transformer_jax.inference import translate as inference
  from transformer_jax.inference.workdir import Workdir

  trained = Workdir(os.path.join(DATA, 'workdir_v1')).load()
  assert trained.tokenizer.special_ids.to_dict() == {'pad': 0, 'eos': 1, 'unk': 2, 'bos': 3}
  assert trained.cfg.special_ids == trained.tokenizer.special_ids
  old, _ = export.load_params(os.path.join(DATA, 'workdir_v1_params.safetensors'))
  new = export.flatten(inference.as_numpy(trained.params))
  old = export.flatten(old)
  assert sorted(new) == sorted(old)
  for name in old:
    np.testing.assert_array_equal(new[name], old[name], err_msg=name)
  expected = open(os.path.join(DATA, 'workdir_v1_greedy.txt')).read().splitlines()
  assert inference.translate_sentences(trained, ['one hundred and five', 'twenty-one'], beam_size=1) == expected


def test_params_only_restore_reads_no_optimizer_state(monkeypatch):
  """Workdir.load restores a tree of parameters only: Adam's moments are never asked for."""
  import orbax.checkpoint as ocp
  from transformer_jax.inference.workdir import Workdir

  asked = []
  original = ocp.CheckpointManager.restore

  def spy(self, step, *args, **kwargs):
    composite = kwargs.get('args')
    if composite is not None and 'state' in composite:
      asked.append(composite['state'])
    return original(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, 'restore', spy)
  trained = Workdir(os.path.join(DATA, 'workdir_v1')).load()
  assert asked and all(set(a.item) == {'params'} and a.partial_restore for a in asked)
  assert 'opt_state' not in trained.params and 'encoder' in trained.params


def test_the_default_task_and_its_metrics_never_import_tensorflow(tmp_path):
  """TensorFlow is an input library here, imported only for TFDS: the generated default task, its tokenizer,
  prepared shards and the TensorBoard events never import it (it costs seconds of CPU per start)."""
  code = f"""
import sys
from configs import tiny
from transformer_jax.training import metrics
from transformer_jax.data import pipeline
config = tiny.get_config()
config.update(max_train_examples=400, max_eval_examples=8, tokenizer_train_sentences=400)
config.model.vocab_size = 96
datasets = pipeline.build_datasets(config, {str(tmp_path)!r})
next(datasets.train)
metrics.MetricsWriter({str(tmp_path)!r}, enabled=True).write(1, {{'loss': 1.5}})
loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets'))
print('tensorflow modules:', loaded)
"""
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'tensorflow modules: []' in result.stdout, result.stdout[-2000:]
  from tensorboard.backend.event_processing import event_accumulator

  events = event_accumulator.EventAccumulator(str(tmp_path / 'tensorboard'))
  events.Reload()
  assert [(e.step, e.value) for e in events.Scalars('loss')] == [(1, 1.5)]
