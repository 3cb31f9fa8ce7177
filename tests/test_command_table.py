"""The command table carries each command's checks, and every error a user meets is one UserError line.

Properties over commands.COMMANDS (every check of every entry decides for its command, through commands.run), over
every UserError subclass in the package (one line, its exit code), and over the package's source (no command-name
branches, no isinstance on a project error outside errors.py)."""

from __future__ import annotations

import ast
import dataclasses
import errno
import importlib
import os

import pytest

from transformer_jax import commands
from transformer_jax import errors
from transformer_jax.training import faults

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'transformer_jax')


@pytest.fixture
def quiet_faults(monkeypatch):
  """commands.run without its process-wide logging filters; records whether stderr went to the detail log."""
  diverted = []
  monkeypatch.setattr(faults, 'divert_library_errors', lambda: None)
  monkeypatch.setattr(faults, 'send_stderr_to_detail_log', lambda: diverted.append(True))
  return diverted


def _bare(spec: commands.Command, body) -> commands.Command:
  """spec with no checks, no buckets, no lock, no jax.distributed, and `body` as what it runs."""
  return dataclasses.replace(
    spec, run=body, flag_checks=(), checks=(), reads=lambda: (), probe=None, writes=None, distributed=False
  )


def _never_runs():
  raise AssertionError('the command ran past a failed check')


# ---------------------------------------------------------------------------------------------------------------------
# The table


def test_every_check_of_every_entry_refuses_its_command(monkeypatch, capsys, quiet_faults):
  """Each check of each entry, failing alone, is the one `error:` line and exit 2, before the body runs; the checks
  ran in the entry's order."""
  tried = 0
  for name, spec in commands.COMMANDS.items():
    kinds = [('flag_checks', i) for i in range(len(spec.flag_checks))] + [
      ('checks', i) for i in range(len(spec.checks))
    ]
    assert ('checks', 0) in kinds, f'{name}: no checks of its config and paths'
    for failing in kinds:
      called = []

      def check(*fv, kind=None):
        called.append(kind)
        return f'{name} {kind[0]} {kind[1]} failed' if kind == failing else None

      stubbed = {
        field: tuple(lambda *fv, kind=(field, i): check(*fv, kind=kind) for i in range(len(getattr(spec, field))))
        for field in ('flag_checks', 'checks')
      }
      monkeypatch.setitem(commands.COMMANDS, name, dataclasses.replace(_bare(spec, _never_runs), **stubbed))
      with pytest.raises(SystemExit) as exit_:
        commands.run(name, [name], names=[])
      assert exit_.value.code == errors.REFUSED, (name, failing)
      assert capsys.readouterr().err == f'error: {name} {failing[0]} {failing[1]} failed\n'
      # every check of the failing one's phase runs (all its lines at once); the flag checks' phase comes first
      assert called == [k for k in kinds if k[0] == 'flag_checks' or failing[0] == 'checks'], (name, failing)
      tried += 1
  assert tried >= 2 * len(commands.COMMANDS)


def test_an_entry_whose_checks_pass_runs_its_body(monkeypatch, quiet_faults):
  for name, spec in commands.COMMANDS.items():
    ran = []
    passing = dataclasses.replace(
      _bare(spec, lambda: ran.append(name)),
      flag_checks=tuple(lambda fv: None for _ in spec.flag_checks),
      checks=tuple(lambda: [] for _ in spec.checks),
    )
    monkeypatch.setitem(commands.COMMANDS, name, passing)
    commands.run(name, [name], names=[])
    assert ran == [name]


def test_a_failing_check_prints_every_line_it_gives(monkeypatch, capsys, quiet_faults):
  spec = commands.COMMANDS['translate']
  lines = dataclasses.replace(_bare(spec, _never_runs), checks=(lambda: ['one', None, 'two'], lambda: 'three'))
  monkeypatch.setitem(commands.COMMANDS, 'translate', lines)
  with pytest.raises(SystemExit) as exit_:
    commands.run('translate', ['translate'], names=[])
  assert exit_.value.code == errors.REFUSED
  assert capsys.readouterr().err == 'error: one\nerror: two\nerror: three\n'


def _python_files():
  for root, _, files in os.walk(PACKAGE):
    for f in sorted(files):
      if f.endswith('.py'):
        path = os.path.join(root, f)
        with open(path, encoding='utf-8') as source:
          yield path, ast.parse(source.read(), path)


def _command_name_branches(tree: ast.AST) -> list[int]:
  """Lines comparing a variable called `command` with a string (or a tuple of them): a branch on a command's name."""

  def is_names(node) -> bool:
    if isinstance(node, ast.Constant):
      return isinstance(node.value, str)
    return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and all(is_names(e) for e in node.elts)

  return [
    node.lineno
    for node in ast.walk(tree)
    if isinstance(node, ast.Compare)
    and isinstance(node.left, ast.Name)
    and node.left.id == 'command'
    and any(is_names(c) for c in node.comparators)
  ]


def test_no_helper_branches_on_a_command_name():
  assert _command_name_branches(ast.parse("if command in ('train', 'prepare'):\n  pass\n")) == [1]  # it can see one
  assert _command_name_branches(ast.parse('if command not in COMMANDS:\n  pass\n')) == []
  found = {path: lines for path, tree in _python_files() if (lines := _command_name_branches(tree))}
  assert found == {}


# ---------------------------------------------------------------------------------------------------------------------
# UserError


def _user_error_classes(trees) -> dict[str, str]:
  """{class name: module path} of every class the source derives from UserError (directly or through another)."""
  derived = {'UserError'}
  classes = {}
  for path, tree in trees:
    for node in ast.walk(tree):
      if isinstance(node, ast.ClassDef):
        bases = {b.attr if isinstance(b, ast.Attribute) else getattr(b, 'id', None) for b in node.bases}
        classes[node.name] = (path, bases)
  grew = True
  while grew:
    grew = False
    for name, (_, bases) in classes.items():
      if name not in derived and bases & derived:
        derived.add(name)
        grew = True
  return {name: classes[name][0] for name in derived if name in classes}


def _module_name(path: str) -> str:
  relative = os.path.relpath(path, os.path.dirname(PACKAGE))
  return relative.removesuffix('.py').removesuffix('/__init__').replace(os.sep, '.')


def _all_subclasses(cls) -> set[type]:
  return {cls} | {s for sub in cls.__subclasses__() for s in _all_subclasses(sub)}


def test_every_user_error_is_one_line_and_its_exit_code_through_run(monkeypatch, capsys, quiet_faults):
  classes = _user_error_classes(_python_files())
  for module in sorted({_module_name(path) for path in classes.values()}):
    importlib.import_module(module)
  found = {c for c in _all_subclasses(errors.UserError) if c.__module__.startswith('transformer_jax')}
  assert {c.__name__ for c in found} >= set(classes)
  assert len(found) >= 14, sorted(c.__name__ for c in found)  # the project's refusals and failures, and the base
  spec = commands.COMMANDS['evaluate']
  for cls in sorted(found, key=lambda c: c.__name__):
    assert cls.exit_code in (errors.REFUSED, errors.FAILED), cls

    def body(cls=cls):
      raise cls('the one line\nthe detail for the log')

    monkeypatch.setitem(commands.COMMANDS, 'evaluate', _bare(spec, body))
    quiet_faults.clear()
    with pytest.raises(SystemExit) as exit_:
      commands.run('evaluate', ['evaluate'], names=[])
    assert exit_.value.code == cls.exit_code, cls
    assert capsys.readouterr().err == 'error: the one line\n', cls
    assert quiet_faults == ([True] if cls.quiet_shutdown else []), cls


def test_a_user_error_keeps_the_builtin_it_specialises():
  """`except ValueError` (and the tests' pytest.raises) still catch the project's ValueError subclasses."""
  from transformer_jax.storage import lock
  from transformer_jax.training import checkpoint

  assert issubclass(checkpoint.ArchitectureMismatchError, ValueError)
  assert issubclass(checkpoint.NoReadableCheckpointError, FileNotFoundError)
  assert issubclass(lock.WorkdirLockedError, RuntimeError)
  assert checkpoint.NoReadableCheckpointError(errno.ENOENT, 'gone').errno == errno.ENOENT


@pytest.mark.parametrize(
  'raised, line, code',
  [
    (ValueError('text dataset: a has 3 lines but b has 2\nmore'), 'text dataset: a has 3 lines but b has 2', 1),
    (FileNotFoundError('no tokenizer at w/spm.model'), 'no tokenizer at w/spm.model', 1),
    (NotImplementedError(), 'NotImplementedError', 1),
    (
      PermissionError(errno.EACCES, 'Permission denied', '/ro/w'),
      'cannot write /ro/w: Permission denied (permission denied); use a writable --workdir / --out',
      1,
    ),
    (
      OSError(errno.EROFS, 'Read-only file system', '/ro/w'),
      'cannot write /ro/w: Read-only file system (read-only file system); use a writable --workdir / --out',
      1,
    ),
    (
      OSError(errno.ENOSPC, 'No space left on device', '/full/w'),
      'no space left on device writing /full/w (No space left on device); free space and rerun (training resumes '
      'from the newest checkpoint)',
      1,
    ),
  ],
)
def test_library_errors_the_user_can_act_on_are_one_line(monkeypatch, capsys, quiet_faults, raised, line, code):
  def body():
    raise raised

  monkeypatch.setitem(commands.COMMANDS, 'evaluate', _bare(commands.COMMANDS['evaluate'], body))
  with pytest.raises(SystemExit) as exit_:
    commands.run('evaluate', ['evaluate'], names=[])
  assert (exit_.value.code, capsys.readouterr().err) == (code, f'error: {line}\n')


@pytest.mark.parametrize('raised', [RuntimeError('a bug'), KeyError('params'), OSError(errno.EIO, 'I/O error')])
def test_other_errors_keep_their_traceback(monkeypatch, quiet_faults, raised):
  def body():
    raise raised

  monkeypatch.setitem(commands.COMMANDS, 'evaluate', _bare(commands.COMMANDS['evaluate'], body))
  with pytest.raises(type(raised)):
    commands.run('evaluate', ['evaluate'], names=[])


def _isinstance_on(tree: ast.AST, names: set[str]) -> list[int]:
  """Lines of isinstance(x, T) calls whose T (or an element of a tuple T) is one of `names` (bare or dotted)."""

  def named(node) -> set[str]:
    if isinstance(node, ast.Tuple):
      return set().union(*(named(e) for e in node.elts))
    return {node.attr if isinstance(node, ast.Attribute) else getattr(node, 'id', None)}

  return [
    node.lineno
    for node in ast.walk(tree)
    if isinstance(node, ast.Call)
    and getattr(node.func, 'id', None) == 'isinstance'
    and len(node.args) == 2
    and named(node.args[1]) & names
  ]


def test_no_module_but_errors_py_tells_project_errors_apart_by_isinstance():
  """A UserError says how it is shown (its message, exit_code, quiet_shutdown): no ladder of isinstance elsewhere."""
  trees = list(_python_files())
  names = set(_user_error_classes(trees))
  assert {'UserError', 'CheckpointSaveError', 'WorkdirLockedError', 'ExportError'} <= names
  ladder = ast.parse('if isinstance(e, (ValueError, checkpoint_lib.CheckpointSaveError)):\n  pass\n')
  assert _isinstance_on(ladder, names) == [1]  # it can see one
  found = {
    os.path.relpath(path, PACKAGE): lines
    for path, tree in trees
    if os.path.basename(path) != 'errors.py' and (lines := _isinstance_on(tree, names))
  }
  assert found == {}
