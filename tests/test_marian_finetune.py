"""Fine-tuning a released OPUS-MT (HF Marian) checkpoint: import as published, train here, export back.

No weights can be downloaded, so the module builds a released-style checkpoint: a random MarianMTModel with OPUS-MT's
settings (swish feed-forward, EOS 0 / UNK 1 / PAD = decoder start = the last id, non-zero biases and
final_logits_bias), two SentencePiece models trained on different tiny corpora and a vocab.json whose order differs
from both, saved with save_pretrained and MarianTokenizer.save_pretrained.
"""

from __future__ import annotations

import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
spm = pytest.importorskip('sentencepiece')

from configs import tiny
from transformer_jax.inference import decode
from transformer_jax import export
from transformer_jax.inference import translate as inference
from transformer_jax import run_config
from transformer_jax.training import train as train_lib
from transformer_jax.data import marian_vocab
from transformer_jax.model.transformer import Transformer, shift_right

EN = [
  'the cat sat on the mat',
  'a dog runs in the park',
  'the house is big',
  'we eat bread and cheese',
  'my friend reads a book',
  'the sun is warm today',
  'she sings a song',
  'they walk to school',
]
DE = [
  'die katze sass auf der matte',
  'ein hund rennt im park',
  'das haus ist gross',
  'wir essen brot und kaese',
  'mein freund liest ein buch',
  'die sonne ist heute warm',
  'sie singt ein lied',
  'sie gehen zur schule',
]
# unknown characters (not in either corpus), a language code, digits, an empty string
PROBES = ['the cat runs', 'Zebra 42 ünd ß!', '>>de<< the dog', 'x y z', '', '你好 the park ✓', 'a  b\tc']


def _spm(sentences, vocab_size, seed):
  spm.set_random_generator_seed(seed)
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(sentences * 4),
    model_writer=model,
    vocab_size=vocab_size,
    hard_vocab_limit=False,
    character_coverage=1.0,
    minloglevel=2,
  )
  return model.getvalue()


def small_config(vocab_size):
  config = tiny.get_config()
  config.model.update(num_layers=2, d_model=32, num_heads=4, d_ff=64, vocab_size=vocab_size, dropout_rate=0.0)
  config.update(
    max_length=16,
    packed_inputs_length=32,
    packed_targets_length=32,
    batch_size=8,
    warmup_steps=1,
    lr_schedule='constant',
    learning_rate=3e-3,
    eval_every_steps=1000,
    checkpoint_every_steps=1000,
    log_every_steps=1,
    stall_patience_steps=0,
    eval_translate_examples=0,
    async_checkpointing=False,
  )
  config.mesh.update(data=1, num_devices=1)
  return config


@pytest.fixture(scope='module')
def released(tmp_path_factory):
  """A released-style OPUS-MT directory: (path, MarianMTModel, MarianTokenizer)."""
  root = tmp_path_factory.mktemp('opus')
  source_spm, target_spm = _spm(EN, 40, 1), _spm(DE, 44, 2)
  pieces = set()
  for proto in (source_spm, target_spm):
    sp = spm.SentencePieceProcessor(model_proto=proto)
    pieces |= {sp.id_to_piece(i) for i in range(sp.get_piece_size())} - {'<unk>', '<s>', '</s>'}
  order = sorted(pieces)
  np.random.default_rng(0).shuffle(order)  # an order neither SentencePiece model has
  vocab = {'</s>': 0, '<unk>': 1, **{p: i + 2 for i, p in enumerate(order)}}
  vocab['<pad>'] = len(vocab)
  size = len(vocab)
  (root / 'source.spm').write_bytes(source_spm)
  (root / 'target.spm').write_bytes(target_spm)
  (root / 'vocab.json').write_text(json.dumps(vocab))
  torch.manual_seed(0)
  config = transformers.MarianConfig(
    vocab_size=size,
    decoder_vocab_size=size,
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    activation_function='swish',
    scale_embedding=True,
    max_position_embeddings=64,
    pad_token_id=size - 1,
    eos_token_id=0,
    decoder_start_token_id=size - 1,
    forced_eos_token_id=0,
    dropout=0.0,
    share_encoder_decoder_embeddings=True,
    bad_words_ids=[[size - 1]],
    num_beams=4,
    max_length=64,
    init_std=0.2,
  )  # larger than HF's 0.02: outputs depend on the input
  model = transformers.MarianMTModel(config).eval()
  with torch.no_grad():  # every bias, layer norm and the final_logits_bias random (HF initialises them to 0 / 1)
    for name, p in model.named_parameters():
      if name.endswith('bias') or 'layer_norm' in name:
        p.add_(torch.randn_like(p) * 0.3)
    model.final_logits_bias.copy_(torch.randn_like(model.final_logits_bias) * 0.5)
    model.final_logits_bias[0, 0] = 5.0  # EOS competes: searches end at different lengths
  model.save_pretrained(str(root))
  tok = transformers.MarianTokenizer(
    source_spm=str(root / 'source.spm'),
    target_spm=str(root / 'target.spm'),
    vocab=str(root / 'vocab.json'),
    source_lang='en',
    target_lang='de',
  )
  tok.save_pretrained(str(root))
  tok = transformers.MarianTokenizer.from_pretrained(str(root))
  return str(root), model, tok


@pytest.fixture(scope='module')
def imported(released, tmp_path_factory):
  path, model, _ = released
  workdir = str(tmp_path_factory.mktemp('ft') / 'run')
  export.import_hf_marian(path, workdir, config=small_config(model.config.vocab_size))
  return workdir


def _hf_logits(model, inputs, decoder_inputs):
  pad = model.config.pad_token_id
  with torch.no_grad():
    return model(
      input_ids=torch.tensor(inputs, dtype=torch.long),
      attention_mask=torch.tensor(inputs != pad, dtype=torch.long),
      decoder_input_ids=torch.tensor(decoder_inputs, dtype=torch.long),
    ).logits.numpy()


def _batch(tok, sentences, targets, pad):
  enc = tok(sentences, text_target=targets, padding=True, return_tensors='np')
  labels = np.where(enc['labels'] == -100, pad, enc['labels'])
  return enc['input_ids'].astype(np.int32), labels.astype(np.int32)


def _our_logits(loaded, inputs, targets):
  cfg = loaded.cfg
  params = jax.tree.map(jnp.asarray, inference.as_numpy(loaded.params))
  return np.asarray(Transformer(cfg).apply({'params': params}, jnp.asarray(inputs), jnp.asarray(targets)))


def test_tokenizer_is_marian_tokenizers(released, imported):
  _, _, tok = released
  ours = inference.load_workdir(imported).tokenizer
  assert isinstance(ours, marian_vocab.MarianVocab)
  assert ours.special_ids.eos == 0 and ours.special_ids.unk == 1 and ours.special_ids.pad == len(tok) - 1
  for text in PROBES + EN[:3]:
    want = tok(text)['input_ids']
    assert ours.encode(text) + [ours.special_ids.eos] == want, text
    want_target = tok(text_target=text)['input_ids']
    assert ours.encode(text, target=True) + [ours.special_ids.eos] == want_target, text
  assert any(1 in tok(t)['input_ids'] for t in PROBES)  # unknown characters occur, and become <unk> alike
  rng = np.random.default_rng(0)
  for text in PROBES + DE[:3]:
    ids = ours.encode(text, target=True) + [0]
    assert ours.decode(ids) == tok.decode(ids, skip_special_tokens=True), text
  for _ in range(20):  # random ids: specials, pieces of only one side's model; ours stop at the first EOS (0)
    ids = rng.integers(0, len(tok), 8).tolist()
    upto = ids[: ids.index(0)] if 0 in ids else ids
    assert ours.decode(ids) == tok.decode(upto, skip_special_tokens=True), ids


def test_imported_logits_equal_marian(released, imported):
  _, model, tok = released
  loaded = inference.load_workdir(imported)
  assert loaded.cfg.activation == 'silu' and loaded.cfg.use_bias and loaded.cfg.final_logits_bias
  pad = model.config.pad_token_id
  inputs, targets = _batch(tok, EN[:4] + PROBES[:2], DE[:4] + PROBES[:2], pad)
  ours = _our_logits(loaded, inputs, targets)
  decoder_inputs = np.asarray(
    shift_right(
      jnp.asarray(targets), jnp.broadcast_to(jnp.arange(targets.shape[1]), targets.shape), bos_id=pad, pad_id=pad
    )
  )
  hf = _hf_logits(model, inputs, decoder_inputs)
  real = targets != pad
  diff = np.max(np.abs(ours - hf)[real])
  assert diff < 1e-4, diff


def test_greedy_and_beam_equal_generate(released, imported):
  _, model, tok = released
  loaded = inference.load_workdir(imported)
  pad = model.config.pad_token_id
  sentences = EN[:3] + PROBES[:2]
  inputs, _ = _batch(tok, sentences, sentences, pad)
  max_len = 12
  with torch.no_grad():
    attention = torch.tensor(inputs != pad, dtype=torch.long)
    hf_greedy = model.generate(
      input_ids=torch.tensor(inputs, dtype=torch.long),
      attention_mask=attention,
      num_beams=1,
      do_sample=False,
      max_length=max_len + 1,
      forced_eos_token_id=None,
    )
  ours = np.asarray(
    decode.greedy_decode(loaded.params, jnp.asarray(inputs), cfg=loaded.cfg, max_decode_len=max_len, extra_length=None)
  )
  for row, want in zip(ours, hf_greedy.numpy()):
    want = want[1:].tolist()  # without the decoder start
    got = row.tolist()[: len(want)]
    assert got == want, (got, want)
  assert tok.batch_decode(hf_greedy, skip_special_tokens=True) == [loaded.tokenizer.decode(r) for r in ours]

  # beam 4 with transformers' length penalty len^alpha (its default alpha 1.0) and stopping heuristic
  results = {}
  for alpha in (1.0, 0.6):
    with torch.no_grad():
      hf_beam = model.generate(
        input_ids=torch.tensor(inputs, dtype=torch.long),
        attention_mask=attention,
        num_beams=4,
        do_sample=False,
        max_length=max_len + 1,
        forced_eos_token_id=None,
        length_penalty=alpha,
        early_stopping=False,
      ).numpy()
    ours, _ = decode.beam_search(
      loaded.params,
      jnp.asarray(inputs),
      cfg=loaded.cfg,
      beam_size=4,
      alpha=alpha,
      max_decode_len=max_len,
      extra_length=None,
      penalty='hf',
    )
    ours = np.asarray(ours)
    for row, want in zip(ours, hf_beam):
      want = want[1:].tolist()
      assert row.tolist()[: len(want)] == want, (alpha, row.tolist(), want)
    results[alpha] = ours.tolist()
  # outputs of several lengths, EOS and limit alike, and the penalty changes them: the comparison can fail
  assert results[1.0] != results[0.6]
  assert len({0 in r for r in results[1.0]}) == 2, results[1.0]


def test_fine_tuning_lowers_the_loss_and_export_round_trips(released, imported, tmp_path):
  path, model, _ = released
  data = tmp_path / 'text'
  data.mkdir()
  for split in ('train', 'validation'):
    (data / f'{split}.en').write_text('\n'.join(EN * 4) + '\n')
    (data / f'{split}.de').write_text('\n'.join(DE * 4) + '\n')
  # what `train --workdir=DIR --config.dataset=... --config.num_train_steps=30` (no --config) runs with
  config = run_config.resolve(
    imported,
    tiny.get_config(),
    explicit=False,
    overrides={'dataset': f'text:{data}', 'num_train_steps': 30, 'model.d_model': 32},
  )
  assert config.vocabulary == 'marian' and config.model.activation == 'silu' and config.batch_size == 8
  with pytest.raises(run_config.ArchitectureOverrideError, match='model.d_ff'):
    run_config.resolve(imported, tiny.get_config(), explicit=False, overrides={'model.d_ff': 128})
  with pytest.raises(run_config.ArchitectureOverrideError, match='vocabulary'):
    run_config.resolve(imported, tiny.get_config(), explicit=False, overrides={'vocabulary': 'sentencepiece'})
  before = train_lib.train_and_evaluate(config, imported)
  assert not os.path.exists(os.path.join(imported, 'spm.model'))  # no SentencePiece model was trained
  rows = [json.loads(line) for line in open(os.path.join(imported, 'metrics.jsonl')) if '"loss"' in line]
  assert rows[-1]['loss'] < 0.7 * rows[0]['loss'], (rows[0], rows[-1])
  assert before['step'] == 30

  out = str(tmp_path / 'export')
  source = export.load_checkpoint(imported)
  export.export(source, 'hf-marian', out)
  back = transformers.MarianMTModel.from_pretrained(out, local_files_only=True).eval()
  back_tok = transformers.MarianTokenizer.from_pretrained(out)
  assert back_tok('Zebra the cat ✓')['input_ids'] == released[2]('Zebra the cat ✓')['input_ids']
  pad = back.config.pad_token_id
  inputs, targets = _batch(back_tok, EN[:4], DE[:4], pad)
  loaded = inference.load_workdir(imported)
  decoder_inputs = np.asarray(
    shift_right(
      jnp.asarray(targets), jnp.broadcast_to(jnp.arange(targets.shape[1]), targets.shape), bos_id=pad, pad_id=pad
    )
  )
  real = targets != pad
  diff = np.max(np.abs(_our_logits(loaded, inputs, targets) - _hf_logits(back, inputs, decoder_inputs))[real])
  assert diff < 1e-4, diff
  # and it is the fine-tuned model, not the released one
  assert np.max(np.abs(_hf_logits(model, inputs, decoder_inputs) - _hf_logits(back, inputs, decoder_inputs))) > 1e-2


@pytest.mark.parametrize(
  'change, field',
  [
    ({'normalize_before': True}, 'normalize_before'),
    ({'decoder_layers': 1}, 'decoder_layers'),
    ({'decoder_vocab_size': 7}, 'decoder_vocab_size'),
    ({'tie_word_embeddings': False}, 'tie_word_embeddings'),
    ({'share_encoder_decoder_embeddings': False}, 'share_encoder_decoder_embeddings'),
    ({'activation_function': 'tanh'}, 'activation_function'),
    ({'add_final_layer_norm': True}, 'add_final_layer_norm'),
    ({'eos_token_id': 3}, 'eos_token_id'),
  ],
)
def test_what_cannot_be_represented_is_refused_naming_the_field(released, tmp_path, change, field):
  path, model, _ = released
  bad = tmp_path / 'bad'
  bad.mkdir()
  for name in os.listdir(path):
    (bad / name).write_bytes(open(os.path.join(path, name), 'rb').read())
  config = json.loads((bad / 'config.json').read_text())
  (bad / 'config.json').write_text(json.dumps(config | change))
  workdir = tmp_path / 'w'
  with pytest.raises(export.ExportError, match=field):
    export.import_hf_marian(str(bad), str(workdir), config=small_config(model.config.vocab_size))
  assert not workdir.exists()
