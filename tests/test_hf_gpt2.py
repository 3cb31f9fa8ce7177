"""hf-gpt2 export/import through transformers (the [hf] extra; skipped without torch/transformers): the same logits
and greedy continuation, AutoTokenizer giving our ids, a random HF GPT-2 imported with its logits, refusals."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

import helpers
from configs import lm_tiny
from transformer_jax import export as export_lib
from transformer_jax.inference import generate
from transformer_jax.inference import workdir as workdir_lib
from transformer_jax.export import hf_gpt2
from transformer_jax.data import lm
from transformer_jax.data import tokenizer as tokenizer_lib
from transformer_jax.model.transformer import LanguageModel

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

VOCAB, LENGTH = 400, 48
TEXTS = [
  'def read_config(path):\n    return open(path).read()\n',
  'x = "h\u00e9llo \u2603\t"  # \u65e5\u672c\n\n',
  '    class A(object):  pass',
  '',
  '<0x41> literally',
]
# Not in TEXTS: a literal '<s>' / '</s>' in the text, which HF tokenizers read as the special token (SentencePiece
# never does).


def _cfg(**overrides):
  return helpers.small_decoder_config(**{'vocab_size': VOCAB, 'max_len': LENGTH, 'scale_embeddings': True, **overrides})


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  root = tmp_path_factory.mktemp('gpt2')
  files = lm.stdlib_files()[:40]
  lines = [line for _, p in files for line in open(p, encoding='utf-8').read().splitlines() if line.strip()]
  proto = tokenizer_lib.train_tokenizer_proto(lines, VOCAB, max_sentences=20_000, options=lm.LM_TOKENIZER_OPTIONS)
  spm_path = root / 'spm.model'
  spm_path.write_bytes(proto)
  cfg = _cfg()  # scale_embeddings=True: the export folds sqrt(D) into wte and ln_f
  model = LanguageModel(cfg)
  params = nn.meta.unbox(model.init(jax.random.key(0), jnp.ones((1, LENGTH), jnp.int32))['params'])
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [np.asarray(x + 0.2 * jax.random.normal(k, x.shape)) for x, k in zip(leaves, keys)])
  config = ml_collections.ConfigDict({'model': dict(cfg.__dict__, dtype='float32')})
  source = export_lib.Exportable(config=config, cfg=cfg, params=params, tokenizer_path=str(spm_path), step=7)
  out = str(root / 'hf')
  export_lib.export(source, 'hf-gpt2', out)
  return source, out, tokenizer_lib.Tokenizer(proto), [p for _, p in lm.stdlib_files()[40:46]]


def test_gpt2_logits_and_greedy_continuation_equal_ours(exported):
  source, out, tok, _ = exported
  hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
  model = LanguageModel(source.cfg)
  ids = [3] + tok.encode(TEXTS[0])[: LENGTH - 9]
  ours = np.asarray(model.apply({'params': source.params}, jnp.asarray([ids[1:] + [4]], jnp.int32)))[0]
  with torch.no_grad():
    theirs = hf(torch.tensor([ids])).logits[0].numpy()
  assert np.abs(ours - theirs).max() <= 1e-4
  prompt = tok.decode(ids[1:])
  completion = generate.generate_texts(source.params, source.cfg, tok, [prompt], max_new_tokens=8, temperature=0.0)
  with torch.no_grad():
    logits_processor = transformers.LogitsProcessorList([_Forbid()])
    sequence = hf.generate(
      torch.tensor([ids]),
      max_new_tokens=8,
      do_sample=False,
      logits_processor=logits_processor,
      pad_token_id=0,
      eos_token_id=1,
    )[0].tolist()
  assert tok.decode(sequence[len(ids) :]) == completion[0]


class _Forbid:
  """PAD and BOS are never generated here (generate.filter_logits): the same rule for HF's greedy search."""

  def __call__(self, input_ids, scores):
    scores[:, [0, 3]] = -float('inf')
    return scores


def test_auto_tokenizer_gives_our_ids_and_our_text(exported):
  _, out, tok, more = exported
  fast = transformers.AutoTokenizer.from_pretrained(out)
  texts = TEXTS + [open(p, encoding='utf-8').read()[:3000] for p in more]
  for text in texts:
    assert fast(text, add_special_tokens=False)['input_ids'] == tok.encode(text), text[:60]
    assert fast(text)['input_ids'] == [3] + tok.encode(text)
    assert fast.decode(tok.encode(text)) == text


def test_a_random_hf_gpt2_imports_with_its_logits_and_trains_on(tmp_path):
  from transformer_jax.training import checkpoint as checkpoint_lib

  torch.manual_seed(0)
  hf = transformers.GPT2LMHeadModel(
    transformers.GPT2Config(
      vocab_size=96,
      n_positions=32,
      n_embd=32,
      n_layer=2,
      n_head=4,
      n_inner=64,
      activation_function='gelu_new',
      resid_pdrop=0.0,
      embd_pdrop=0.0,
      attn_pdrop=0.0,
    )
  ).eval()
  with torch.no_grad():  # random biases and norms too (fresh GPT-2 has zero biases, unit norms)
    for p in hf.parameters():
      p.add_(0.1 * torch.randn_like(p))
  hf.save_pretrained(str(tmp_path / 'hf'))
  workdir = str(tmp_path / 'workdir')
  count = hf_gpt2.import_gpt2(str(tmp_path / 'hf'), workdir, config=lm_tiny.get_config())
  assert count == sum(p.numel() for n, p in hf.named_parameters() if 'lm_head' not in n) - 2 * 32  # no key bias
  checkpointer = checkpoint_lib.Checkpointer(workdir, read_only=True)
  config = ml_collections.ConfigDict(checkpointer.restore_config())
  abstract, mesh = workdir_lib.trainer_abstract_state(config)
  with jax.set_mesh(mesh):
    state, data_state, step = checkpointer.restore(abstract)
  checkpointer.close()
  assert step == 0 and data_state['step'] == 0 and config.model.kind == 'decoder'
  ids = np.random.default_rng(0).integers(4, 96, (2, 20))
  with torch.no_grad():
    theirs = hf(torch.tensor(np.concatenate([np.full((2, 1), 3), ids[:, :-1]], 1))).logits.numpy()
  params = jax.device_get(state.params)
  ours = np.asarray(
    LanguageModel(_cfg(vocab_size=96, max_len=32, d_ff=64, scale_embeddings=False)).apply(
      {'params': params}, jnp.asarray(ids, jnp.int32)
    )
  )
  assert np.abs(ours - theirs).max() <= 1e-4
  with pytest.raises(export_lib.ExportError, match='already has checkpoints'):
    hf_gpt2.import_gpt2(str(tmp_path / 'hf'), workdir, config=lm_tiny.get_config())


@pytest.mark.parametrize(
  'change',
  [
    dict(pre_norm=False),
    dict(positional='sinusoidal'),
    dict(activation='relu'),
    dict(use_bias=False),
    dict(kind='encoder_decoder'),
  ],
)
def test_a_model_gpt2_cannot_represent_is_refused_in_one_line(change):
  with pytest.raises(export_lib.ExportError) as e:
    hf_gpt2.check_representable(_cfg(**change))
  assert 'hf-gpt2 needs' in str(e.value) and '\n' not in str(e.value)
