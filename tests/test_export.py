"""Exports re-import bit for bit; HF Marian computes our function; StableHLO reloads without the model code."""

import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import tiny
from transformer_jax.inference import decode
from transformer_jax import export
from transformer_jax.inference import scores
from transformer_jax.training import train_state
from transformer_jax.data import tokenizer as tokenizer_lib
from transformer_jax.model.transformer import Transformer, shift_right
import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SENTENCES = [
  'one hundred and five',
  'seventy',
  'three thousand four hundred and twelve',
  'nine',
  'forty-two',
  'twenty thousand',
  'eleven',
  'five hundred',
]
WORDS = (
  'one two three four five six seven eight nine ten eleven twelve twenty thirty forty fifty sixty seventy '
  'eighty ninety hundred thousand million and'
).split()


def small_config(vocab_size: int = 64):
  config = tiny.get_config()
  config.model.update(num_layers=2, d_model=32, num_heads=4, d_ff=64, vocab_size=vocab_size, dropout_rate=0.0)
  config.update(max_length=12, packed_inputs_length=16, packed_targets_length=12)
  return config


def random_params(config, seed):
  """Every parameter random, layer-norm scales near 1 and biases near 0 (not exactly 1 and 0, or a mis-permuted
  one would not show). Shapes from jax.eval_shape: nothing to compile."""
  model = Transformer(train_state.model_config(config))
  dummy = jnp.ones((1, 4), jnp.int32)
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), dummy, dummy)['params'])
  rng = np.random.default_rng(seed)

  def f(path, x):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      return (1 + rng.normal(0, 0.2, x.shape)).astype(np.float32)
    return rng.normal(0, 0.2, x.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(f, shapes)


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A checkpointed workdir (step 7) of a random tiny model with a tiny SentencePiece vocabulary."""
  root = tmp_path_factory.mktemp('run')
  rng = np.random.default_rng(0)
  corpus = [' '.join(rng.choice(WORDS, rng.integers(1, 6))) for _ in range(400)]
  proto = tokenizer_lib.train_tokenizer_proto(corpus, 60)
  with open(root / 'spm.model', 'wb') as f:
    f.write(proto)
  config = small_config()
  params = random_params(config, 1)
  embedding = params['shared_embedding']['embedding']
  # PAD and BOS would often win the argmax: both searches must forbid them (decode.py; bad_words_ids for HF)
  embedding[tokenizer_lib.PAD_ID] = 2 * embedding[10]
  embedding[tokenizer_lib.BOS_ID] = 2 * embedding[11]
  export.write_checkpoint(str(root), config, params, step=7)
  return str(root)


@pytest.fixture(scope='module')
def source(workdir):
  return export.load_checkpoint(workdir)


@pytest.fixture(scope='module')
def rows(source):
  tok = tokenizer_lib.Tokenizer.load(source.tokenizer_path)
  return scores.encode_sources(tok, SENTENCES, int(source.config.max_length))


def _greedy(params, cfg, rows, max_len):
  return np.asarray(
    decode.greedy_decode(jax.tree.map(jnp.asarray, params), jnp.asarray(rows), cfg=cfg, max_decode_len=max_len)
  )


@functools.partial(jax.jit, static_argnums=(1,))
def _jit_logits(params, cfg, inputs, targets):
  return Transformer(cfg).apply({'params': params}, inputs, targets)


def _logits(params, cfg, inputs, targets):
  return np.asarray(_jit_logits(jax.tree.map(jnp.asarray, params), cfg, jnp.asarray(inputs), jnp.asarray(targets)))


def test_checkpoint_selection_and_missing_checkpoint(workdir, source, tmp_path):
  assert source.step == 7
  by_dir = export.load_checkpoint(workdir, checkpoint=os.path.join(workdir, 'checkpoints', '7'))
  by_step = export.load_checkpoint(workdir, checkpoint='7')
  for other in (by_dir, by_step):
    jax.tree.map(np.testing.assert_array_equal, other.params, source.params)
  with pytest.raises(FileNotFoundError, match='no checkpoint step 8'):
    export.load_checkpoint(workdir, checkpoint=8)
  with pytest.raises(FileNotFoundError, match='no checkpoint'):
    export.load_checkpoint(str(tmp_path))


@pytest.mark.parametrize('fmt,name', [('safetensors', 'model.safetensors'), ('msgpack', 'model.msgpack')])
def test_round_trip_is_bitwise_and_translates_identically(source, rows, tmp_path, fmt, name):
  out = str(tmp_path / name)
  written = export.export(source, fmt, out)
  assert sorted(written) == sorted([out, str(tmp_path / 'spm.model')])
  params, metadata = export.load_params(out)
  assert metadata['step'] == '7' and metadata['dtype'] == 'float32'
  assert metadata['config'].model.d_model == 32
  assert open(metadata['tokenizer'], 'rb').read() == open(source.tokenizer_path, 'rb').read()
  assert jax.tree.structure(params) == jax.tree.structure(source.params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(source.params)):
    assert a.dtype == np.float32 and a.shape == b.shape
    assert a.tobytes() == b.tobytes()  # bitwise
  loaded = export.load_export(out)
  max_len = int(source.config.max_length)
  np.testing.assert_array_equal(
    _greedy(loaded.params, loaded.cfg, rows, max_len), _greedy(source.params, source.cfg, rows, max_len)
  )
  # bfloat16: the stored values are the rounded parameters
  out16 = str(tmp_path / ('bf16-' + name))
  export.export(source, fmt, out16, dtype='bfloat16')
  params16, _ = export.load_params(out16)
  for a, b in zip(jax.tree.leaves(params16), jax.tree.leaves(source.params)):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_array_equal(a, b.astype(jnp.bfloat16))


def test_safetensors_is_readable_by_the_reference_reader(source, tmp_path):
  import safetensors  # (a core dependency: missing is a failure, not a skip)

  out = str(tmp_path / 'model.safetensors')
  export.export(source, 'safetensors', out)
  with safetensors.safe_open(out, framework='np') as f:
    assert f.metadata()['format'] == 'transformer_jax'
    json.loads(f.metadata()['config'])
    kernel = f.get_tensor('encoder.layers_0.self_attention.query.kernel')
  np.testing.assert_array_equal(kernel, source.params['encoder']['layers_0']['self_attention']['query']['kernel'])
  assert kernel.shape == (32, 4, 8)


def test_bad_targets_and_formats(source, tmp_path):
  out = tmp_path / 'model.safetensors'
  out.write_bytes(b'precious')
  with pytest.raises(export.ExportError, match='exists; pass --overwrite'):
    export.export(source, 'safetensors', str(out))
  assert out.read_bytes() == b'precious' and not (tmp_path / 'spm.model').exists()  # nothing written
  (tmp_path / 'spm.model').write_bytes(b'another vocabulary')
  out.unlink()
  with pytest.raises(export.ExportError, match='spm.model exists'):
    export.export(source, 'msgpack', str(tmp_path / 'model.msgpack'))
  assert not (tmp_path / 'model.msgpack').exists()
  export.export(source, 'msgpack', str(tmp_path / 'model.msgpack'), overwrite=True)
  assert (tmp_path / 'spm.model').read_bytes() == open(source.tokenizer_path, 'rb').read()
  hf_dir = tmp_path / 'hf'
  hf_dir.mkdir()
  (hf_dir / 'notes.txt').write_text('keep')
  with pytest.raises(export.ExportError, match='not empty'):
    export.export(source, 'hf-marian', str(hf_dir))
  assert os.listdir(hf_dir) == ['notes.txt']
  with pytest.raises(export.ExportError, match='unknown format'):
    export.export(source, 'onnx', str(tmp_path / 'x'))
  with pytest.raises(export.ExportError, match='is a directory'):
    export.export(source, 'safetensors', str(hf_dir))


def _cli(*args):
  return helpers.cli(*args, timeout=120)


def test_cli_refuses_an_existing_target_and_an_empty_workdir(workdir, tmp_path):
  out = tmp_path / 'model.safetensors'
  out.write_bytes(b'precious')
  result = _cli('export', f'--workdir={workdir}', '--format=safetensors', f'--out={out}')
  assert result.returncode != 0
  assert result.stderr.strip().splitlines() == [f'error: {out} exists; pass --overwrite to replace it']
  assert out.read_bytes() == b'precious'
  for args, expected in (
    ((f'--workdir={tmp_path}', '--format=msgpack', f'--out={tmp_path / "m.msgpack"}'), 'no checkpoint'),
    ((f'--workdir={workdir}', '--format=onnx', f'--out={tmp_path / "m"}'), 'onnx'),
  ):
    result = _cli('export', *args)
    errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert result.returncode != 0 and len(errors) == 1 and expected in errors[0], result.stderr
    assert result.stderr.strip().splitlines()[-1] == errors[0]
  assert sorted(os.listdir(tmp_path)) == ['model.safetensors']


# ---------------------------------------------------------------------------------------------------------------------
# HF Marian


def _torch_modules():
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  torch.manual_seed(0)
  return torch, transformers


def _hf_logits(torch, model, inputs, decoder_inputs):
  with torch.no_grad():
    out = model(
      input_ids=torch.tensor(np.asarray(inputs), dtype=torch.long),
      attention_mask=torch.tensor(np.asarray(inputs) != 0, dtype=torch.long),
      decoder_input_ids=torch.tensor(np.asarray(decoder_inputs), dtype=torch.long),
    )
  return out.logits.numpy()


def _targets(vocab_size, rows, length, seed=0):
  return np.random.default_rng(seed).integers(4, vocab_size, (rows, length)).astype(np.int32)


def test_hf_marian_export_computes_our_function(source, rows, tmp_path):
  torch, transformers = _torch_modules()
  out = str(tmp_path / 'marian')
  export.export(source, 'hf-marian', out)
  model = transformers.MarianMTModel.from_pretrained(out, local_files_only=True).eval()
  tok = transformers.MarianTokenizer.from_pretrained(out, local_files_only=True)
  ours = tokenizer_lib.Tokenizer.load(source.tokenizer_path)
  for sentence in SENTENCES:
    assert tok(sentence)['input_ids'] == ours.encode(sentence) + [tokenizer_lib.EOS_ID]

  targets = _targets(source.cfg.vocab_size, len(rows), 7)
  decoder_inputs = np.asarray(shift_right(jnp.asarray(targets), jnp.broadcast_to(jnp.arange(7), targets.shape)))
  assert (decoder_inputs[:, 0] == tokenizer_lib.BOS_ID).all()
  ours_logits = _logits(source.params, source.cfg, rows, targets)
  hf_logits = _hf_logits(torch, model, rows, decoder_inputs)
  diff = float(np.max(np.abs(ours_logits - hf_logits)))
  print(f'max |logit difference| ours vs transformers: {diff:.3g}')
  assert diff < 1e-4

  max_len = int(source.config.max_length)
  greedy = _greedy(source.params, source.cfg, rows, max_len)
  with torch.no_grad():
    generated = model.generate(
      input_ids=torch.tensor(rows, dtype=torch.long),
      attention_mask=torch.tensor(rows != 0, dtype=torch.long),
      num_beams=1,
      do_sample=False,
      max_new_tokens=max_len,
    ).numpy()
  unconstrained = model.generate(
    input_ids=torch.tensor(rows, dtype=torch.long),
    attention_mask=torch.tensor(rows != 0, dtype=torch.long),
    num_beams=1,
    do_sample=False,
    max_new_tokens=max_len,
    bad_words_ids=None,
  ).numpy()
  before_eos = [row[: list(row).index(1)] if 1 in row else row for row in unconstrained[:, 1:].tolist()]
  assert any(t in (tokenizer_lib.PAD_ID, tokenizer_lib.BOS_ID) for row in before_eos for t in row)  # has teeth
  assert (generated[:, 0] == tokenizer_lib.BOS_ID).all()
  generated = generated[:, 1:]
  padded = np.zeros_like(greedy)
  padded[:, : generated.shape[1]] = generated
  np.testing.assert_array_equal(padded, greedy)
  assert (greedy >= ours.vocab_size).any()  # ids without a piece occur (random model), and decode as ours do
  assert tok.batch_decode(generated, skip_special_tokens=True) == scores.decode_outputs(ours, greedy)
  with torch.no_grad():  # generation_config.json's defaults are greedy too
    full = model.generate(
      input_ids=torch.tensor(rows[:2], dtype=torch.long), attention_mask=torch.tensor(rows[:2] != 0, dtype=torch.long)
    )
  assert tok.batch_decode(full, skip_special_tokens=True) == scores.decode_outputs(ours, greedy[:2])


def _random_marian(transformers, torch, vocab_size):
  config = transformers.MarianConfig(
    vocab_size=vocab_size,
    decoder_vocab_size=vocab_size,
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    activation_function='relu',
    scale_embedding=True,
    max_position_embeddings=64,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=3,
    forced_eos_token_id=None,
    dropout=0.0,
    share_encoder_decoder_embeddings=True,
  )
  model = transformers.MarianMTModel(config).eval()
  with torch.no_grad():  # give the parameters HF initialises to 1/0 random values too
    for name, p in model.named_parameters():
      if 'layer_norm' in name or name.endswith('fc1.bias') or name.endswith('fc2.bias'):
        p.add_(torch.randn_like(p) * 0.2)
  return model


def test_import_of_an_hf_marian_model_gives_its_logits(source, rows, tmp_path):
  torch, transformers = _torch_modules()
  from transformer_jax.inference import translate as inference

  vocab_size = source.cfg.vocab_size
  hf_dir = tmp_path / 'hf'
  model = _random_marian(transformers, torch, vocab_size)
  model.save_pretrained(str(hf_dir))
  spm_bytes = open(source.tokenizer_path, 'rb').read()
  (hf_dir / 'source.spm').write_bytes(spm_bytes)
  (hf_dir / 'target.spm').write_bytes(spm_bytes)
  (hf_dir / 'vocab.json').write_text(json.dumps(export.marian_vocab(source.tokenizer_path, vocab_size)))

  workdir = str(tmp_path / 'imported')
  export.import_hf_marian(str(hf_dir), workdir, config=small_config(vocab_size))
  loaded = inference.load_workdir(workdir)
  params = inference.as_numpy(loaded.params)
  targets = _targets(vocab_size, len(rows), 6, seed=3)
  decoder_inputs = np.asarray(shift_right(jnp.asarray(targets), jnp.broadcast_to(jnp.arange(6), targets.shape)))
  diff = np.max(np.abs(_logits(params, loaded.cfg, rows, targets) - _hf_logits(torch, model, rows, decoder_inputs)))
  assert diff < 1e-4, diff
  assert open(os.path.join(workdir, 'spm.model'), 'rb').read() == spm_bytes

  # a second import into the same workdir needs overwrite; what we cannot represent is refused
  with pytest.raises(export.ExportError, match='already has checkpoints'):
    export.import_hf_marian(str(hf_dir), workdir, config=small_config(vocab_size))
  biased = tmp_path / 'biased'
  model.save_pretrained(str(biased))
  for name in ('source.spm', 'target.spm', 'vocab.json'):
    (biased / name).write_bytes((hf_dir / name).read_bytes())
  config = json.loads((biased / 'config.json').read_text())
  (biased / 'config.json').write_text(json.dumps(config | {'normalize_before': True}))
  with pytest.raises(export.ExportError, match='normalize_before'):
    export.import_hf_marian(str(biased), str(tmp_path / 'w2'), config=small_config(vocab_size))
  (biased / 'config.json').write_text(json.dumps(config | {'activation_function': 'tanh'}))
  with pytest.raises(export.ExportError, match='activation_function'):
    export.import_hf_marian(str(biased), str(tmp_path / 'w3'), config=small_config(vocab_size))
  assert not os.path.exists(tmp_path / 'w2' / 'checkpoints') and not os.path.exists(tmp_path / 'w3')


def test_hf_marian_without_the_permutation_would_differ(source, rows, tmp_path, monkeypatch):
  """The check above can fail: exporting without reordering the model dimension changes HF's logits."""
  torch, transformers = _torch_modules()
  monkeypatch.setattr(export.hf_marian, '_marian_permutation', lambda d: np.arange(d))
  out = str(tmp_path / 'marian')
  export.export(source, 'hf-marian', out)
  model = transformers.MarianMTModel.from_pretrained(out, local_files_only=True).eval()
  targets = _targets(source.cfg.vocab_size, len(rows), 7)
  decoder_inputs = np.asarray(shift_right(jnp.asarray(targets), jnp.broadcast_to(jnp.arange(7), targets.shape)))
  diff = np.max(
    np.abs(_logits(source.params, source.cfg, rows, targets) - _hf_logits(torch, model, rows, decoder_inputs))
  )
  assert diff > 1e-2


def test_hf_marian_export_then_import_round_trips(source, tmp_path):
  out = str(tmp_path / 'marian')
  export.export(source, 'hf-marian', out)
  back = export.from_marian_state_dict(export.read_safetensors(os.path.join(out, 'model.safetensors'))[0], source.cfg)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(source.params)):
    assert a.tobytes() == b.tobytes()
  assert jax.tree.structure(back) == jax.tree.structure(source.params)


def test_hf_marian_export_of_a_scan_layers_model_matches_the_loop(source):
  config = small_config()
  config.model.scan_layers = True
  cfg = train_state.model_config(config)
  dummy = jnp.ones((1, 4), jnp.int32)
  shapes = nn.meta.unbox(jax.eval_shape(Transformer(cfg).init, jax.random.key(0), dummy, dummy)['params'])
  stacked = dict(source.params)
  for side in ('encoder', 'decoder'):
    layers = [source.params[side][f'layers_{i}'] for i in range(cfg.num_layers)]
    stacked[side] = {'layers': jax.tree.map(lambda *xs: np.stack(xs), *layers)}
  assert jax.tree.structure(stacked) == jax.tree.structure(shapes)
  assert jax.tree.map(np.shape, stacked) == jax.tree.map(lambda x: x.shape, shapes)
  looped = export.to_marian_state_dict(source.params, source.cfg)
  scanned = export.to_marian_state_dict(stacked, cfg)
  assert looped.keys() == scanned.keys()
  for name in looped:
    np.testing.assert_array_equal(looped[name], scanned[name])


# ---------------------------------------------------------------------------------------------------------------------
# StableHLO


def test_stablehlo_reloads_without_the_model_code(source, rows, tmp_path):
  out = tmp_path / 'model.stablehlo'
  export.export(source, 'stablehlo', str(out), platforms=('cpu',))
  assert (tmp_path / 'spm.model').exists()
  max_len = int(source.config.max_length)
  expected = _greedy(source.params, source.cfg, rows, max_len)[:5]  # rows decode independently
  np.save(tmp_path / 'inputs.npy', rows[:5, :9])  # another batch size and source length than anything traced
  script = textwrap.dedent(f"""
      import sys
      import jax, numpy as np
      exported = jax.export.deserialize(bytearray(open({str(out)!r}, 'rb').read()))
      out = exported.call(np.load({str(tmp_path / 'inputs.npy')!r}))
      np.save({str(tmp_path / 'outputs.npy')!r}, np.asarray(out))
      assert not any(m.startswith('transformer_jax') for m in sys.modules), 'project code was imported'
      """)
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  result = subprocess.run(
    [sys.executable, '-c', script], capture_output=True, text=True, cwd=str(tmp_path), env=env, timeout=120
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert (rows[:5, 9:] == 0).all()  # the cut-off columns were padding, so the translations must not change
  np.testing.assert_array_equal(np.load(tmp_path / 'outputs.npy'), expected)
