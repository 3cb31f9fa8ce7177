"""hf-gpt2: a decoder-only workdir <-> a directory transformers.GPT2LMHeadModel / AutoTokenizer load.

Export writes config.json, model.safetensors, tokenizer.json (+ tokenizer_config.json, a fast tokenizer built
from our SentencePiece model: same pieces, scores, byte fallback, BOS prepended as our model expects), spm.model
and transformer_jax_config.json. GPT-2 is pre-norm with learned positions, GELU (tanh), biases and a final
LayerNorm; anything else is refused with one line. Mapping (ours -> GPT-2):
  embedding.embedding [V, D]                 -> transformer.wte.weight (x sqrt(D) with scale_embeddings, and the
                                                final LayerNorm / sqrt(D), so tied logits stay the same)
  decoder.positional.pos_embedding           -> transformer.wpe.weight
  layers_i.self_attention.{query,key,value}  -> h.i.attn.c_attn [D, 3D] (kernels [D, H, K] flattened head-major;
                                                key bias 0: a key bias adds the same q.b to every logit of a
                                                query, which softmax ignores, so on import it is dropped exactly)
  layers_i.self_attention.out [H, K, D]      -> h.i.attn.c_proj [D, D]
  layers_i.feed_forward.{wi,wo}              -> h.i.mlp.{c_fc,c_proj} (Conv1D weights are [in, out], as ours)
  layers_i.{self_attention,feed_forward}_norm, decoder.final_norm -> h.i.ln_1, h.i.ln_2, transformer.ln_f
"""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np

from transformer_jax.inference import workdir as workdir_lib
from transformer_jax.export import files
from transformer_jax.export.files import ExportError
from transformer_jax.export.hf_marian import _unscan
from transformer_jax.export.safetensors import read_safetensors, write_safetensors
from transformer_jax.model.vocab import DEFAULT_SPECIAL_IDS

# GPT-2 directories written here keep our SentencePiece ids (the project's defaults).
PAD_ID, EOS_ID, UNK_ID, BOS_ID = (
  DEFAULT_SPECIAL_IDS.pad,
  DEFAULT_SPECIAL_IDS.eos,
  DEFAULT_SPECIAL_IDS.unk,
  DEFAULT_SPECIAL_IDS.bos,
)

NAME = 'hf-gpt2'
SUMMARY = 'language models: a directory transformers.GPT2LMHeadModel / AutoTokenizer load'
WRITES_DIRECTORY = True
_TANH_GELUS = ('gelu_new', 'gelu_pytorch_tanh', 'gelu_fast')


def check_representable(cfg) -> None:
  problems = []
  if cfg.kind != 'decoder':
    problems.append('a decoder-only model (model.kind=decoder)')
  if not cfg.pre_norm:
    problems.append('pre-norm (model.pre_norm=True)')
  if cfg.positional != 'learned':
    problems.append("learned positions (model.positional='learned')")
  if cfg.activation != 'gelu':
    problems.append("GELU (model.activation='gelu')")
  if not cfg.use_bias:
    problems.append('attention biases (model.use_bias=True)')
  if problems:
    raise ExportError(f'hf-gpt2 needs {", ".join(problems)}; this model cannot be written as GPT-2')


def to_gpt2_state_dict(params, cfg) -> dict[str, np.ndarray]:
  check_representable(cfg)
  params = _unscan(params, cfg.num_layers) if cfg.scan_layers else params
  d = cfg.d_model
  scale = math.sqrt(d) if cfg.scale_embeddings else 1.0
  f32 = lambda x: np.asarray(x, np.float32)
  dec = params['decoder']
  out = {
    'transformer.wte.weight': f32(params['embedding']['embedding']) * np.float32(scale),
    'transformer.wpe.weight': f32(dec['positional']['pos_embedding']),
    'transformer.ln_f.weight': f32(dec['final_norm']['scale']) / np.float32(scale),
    'transformer.ln_f.bias': f32(dec['final_norm']['bias']) / np.float32(scale),
  }
  for i in range(cfg.num_layers):
    layer, h = dec[f'layers_{i}'], f'transformer.h.{i}.'
    att = layer['self_attention']
    kernels = [f32(att[n]['kernel']).reshape(d, d) for n in ('query', 'key', 'value')]
    out[h + 'attn.c_attn.weight'] = np.concatenate(kernels, axis=1)
    out[h + 'attn.c_attn.bias'] = np.concatenate(
      [f32(att['query']['bias']).reshape(d), np.zeros(d, np.float32), f32(att['value']['bias']).reshape(d)]
    )
    out[h + 'attn.c_proj.weight'] = f32(att['out']['kernel']).reshape(d, d)
    out[h + 'attn.c_proj.bias'] = f32(att['out']['bias'])
    for ours, theirs in (('self_attention_norm', 'ln_1'), ('feed_forward_norm', 'ln_2')):
      out[h + theirs + '.weight'] = f32(layer[ours]['scale'])
      out[h + theirs + '.bias'] = f32(layer[ours]['bias'])
    for ours, theirs in (('wi', 'c_fc'), ('wo', 'c_proj')):
      out[h + f'mlp.{theirs}.weight'] = f32(layer['feed_forward'][ours]['kernel'])
      out[h + f'mlp.{theirs}.bias'] = f32(layer['feed_forward'][ours]['bias'])
  return out


def from_gpt2_state_dict(state: dict[str, np.ndarray], num_layers: int, num_heads: int) -> dict:
  """GPT-2 tensors (with or without the 'transformer.' prefix) -> our parameter tree (scale_embeddings=False)."""
  state = {
    k[len('transformer.') :] if k.startswith('transformer.') else k: np.asarray(v, np.float32) for k, v in state.items()
  }
  d = state['wte.weight'].shape[1]
  k = d // num_heads
  layers = {}
  for i in range(num_layers):
    h = f'h.{i}.'
    qkv_w, qkv_b = np.split(state[h + 'attn.c_attn.weight'], 3, axis=1), np.split(state[h + 'attn.c_attn.bias'], 3)
    layers[f'layers_{i}'] = {
      'self_attention': {
        'query': {'kernel': qkv_w[0].reshape(d, num_heads, k), 'bias': qkv_b[0].reshape(num_heads, k)},
        'key': {'kernel': qkv_w[1].reshape(d, num_heads, k)},  # its bias changes nothing (module doc)
        'value': {'kernel': qkv_w[2].reshape(d, num_heads, k), 'bias': qkv_b[2].reshape(num_heads, k)},
        'out': {
          'kernel': state[h + 'attn.c_proj.weight'].reshape(num_heads, k, d),
          'bias': state[h + 'attn.c_proj.bias'],
        },
      },
      'self_attention_norm': {'scale': state[h + 'ln_1.weight'], 'bias': state[h + 'ln_1.bias']},
      'feed_forward_norm': {'scale': state[h + 'ln_2.weight'], 'bias': state[h + 'ln_2.bias']},
      'feed_forward': {
        'wi': {'kernel': state[h + 'mlp.c_fc.weight'], 'bias': state[h + 'mlp.c_fc.bias']},
        'wo': {'kernel': state[h + 'mlp.c_proj.weight'], 'bias': state[h + 'mlp.c_proj.bias']},
      },
    }
  decoder = {
    'positional': {'pos_embedding': state['wpe.weight']},
    'final_norm': {'scale': state['ln_f.weight'], 'bias': state['ln_f.bias']},
    **layers,
  }
  return {'embedding': {'embedding': state['wte.weight']}, 'decoder': decoder}


def gpt2_config(cfg) -> dict:
  return {
    'architectures': ['GPT2LMHeadModel'],
    'model_type': 'gpt2',
    'vocab_size': cfg.vocab_size,
    'n_positions': cfg.max_len,
    'n_embd': cfg.d_model,
    'n_layer': cfg.num_layers,
    'n_head': cfg.num_heads,
    'n_inner': cfg.d_ff,
    'activation_function': 'gelu_new',
    'resid_pdrop': 0.0,
    'embd_pdrop': 0.0,
    'attn_pdrop': 0.0,
    'layer_norm_epsilon': 1e-5,
    'initializer_range': 0.02,
    'scale_attn_weights': True,
    'bos_token_id': BOS_ID,
    'eos_token_id': EOS_ID,
    'pad_token_id': PAD_ID,
    'tie_word_embeddings': True,
    'torch_dtype': 'float32',
    'use_cache': True,
  }


def fast_tokenizer(spm_proto: bytes):
  """A `tokenizers` Unigram tokenizer with our SentencePiece pieces and scores (no normalization, byte fallback,
  newline and control pieces as added tokens), prepending BOS; decoding gives the text back."""
  from sentencepiece import sentencepiece_model_pb2
  from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(spm_proto)
  normal, user_defined = 1, 4
  # Only normal and user-defined pieces are matched against text; control and byte pieces never are (bytes come
  # from byte fallback, looked up by name), so they get a score Viterbi never picks.
  vocab = [(p.piece, p.score if p.type in (normal, user_defined) else -1e9) for p in proto.pieces]
  tok = Tokenizer(models.Unigram(vocab, unk_id=UNK_ID, byte_fallback=True))
  tok.normalizer = normalizers.Replace(' ', '\u2581')
  tok.decoder = decoders.Sequence([decoders.Replace('\u2581', ' '), decoders.ByteFallback(), decoders.Fuse()])
  specials = [proto.pieces[i].piece for i in (PAD_ID, EOS_ID, UNK_ID, BOS_ID)]
  tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
  tok.add_tokens([AddedToken(p.piece, normalized=False, special=False) for p in proto.pieces if p.type == user_defined])
  tok.post_processor = processors.TemplateProcessing(
    single=f'{specials[3]} $A', pair=f'{specials[3]} $A $B', special_tokens=[(specials[3], BOS_ID)]
  )
  return tok, specials


def check_target(out: str, *, dtype: str, overwrite: bool, tokenizer_path: str | None) -> None:
  del dtype, tokenizer_path
  if files.paths.is_gcs(out):  # transformers' save_pretrained writes local files only
    raise files.ExportError(
      f'--format=hf-gpt2 writes a local directory; export to a local --out, then copy it '
      f'(gcloud storage cp -r DIR {out})'
    )
  files.check_dir_target(out, overwrite)


def write(source, out: str, *, dtype: str = 'float32', overwrite: bool = False, **unused) -> list[str]:
  del unused
  return export(source, out, dtype=dtype, overwrite=overwrite)


def export(source, out: str, *, dtype: str = 'float32', overwrite: bool = False) -> list[str]:
  check_representable(source.cfg)
  files.check_dir_target(out, overwrite)
  from transformers import PreTrainedTokenizerFast

  state = to_gpt2_state_dict(source.params, source.cfg)
  if dtype == 'bfloat16':
    state = files.cast(state, dtype)
  os.makedirs(out, exist_ok=True)
  write_safetensors(os.path.join(out, 'model.safetensors'), state, {'format': 'pt'})
  files.write_json(os.path.join(out, 'config.json'), gpt2_config(source.cfg))
  spm_proto = files.read(source.tokenizer_path)
  tok, (pad, eos, unk, bos) = fast_tokenizer(spm_proto)
  PreTrainedTokenizerFast(
    tokenizer_object=tok,
    bos_token=bos,
    eos_token=eos,
    unk_token=unk,
    pad_token=pad,
    model_max_length=source.cfg.max_len,
  ).save_pretrained(out)
  files.write_bytes(os.path.join(out, files.TOKENIZER_NAME), spm_proto)
  files.write_json(
    os.path.join(out, 'transformer_jax_config.json'),
    {**json.loads(source.config.to_json_best_effort()), 'step': source.step},
  )
  return sorted(os.path.join(out, n) for n in os.listdir(out))


def import_gpt2(path: str, workdir: str, *, config=None, overwrite: bool = False) -> int:
  """A GPT-2 directory (config.json + model.safetensors) -> a workdir checkpoint (step 0) that trains on.

  The config (data, optimizer, mesh) is `config`, else the transformer_jax_config.json an export wrote (the CLI
  passes configs/lm_tiny.py otherwise); the architecture comes from config.json. spm.model is copied when the directory has one (our
  exports do); otherwise the first training run trains a tokenizer, whose ids are not GPT-2's."""
  if not path or not os.path.isdir(path):
    raise FileNotFoundError(f'--path={path} is not a directory')
  config_path, weights = os.path.join(path, 'config.json'), os.path.join(path, 'model.safetensors')
  if not os.path.exists(config_path):
    raise FileNotFoundError(f'no config.json in {path}')
  if not os.path.exists(weights):
    raise FileNotFoundError(f'no model.safetensors in {path} (pickled pytorch_model.bin is never loaded)')
  with open(config_path) as f:
    hf = json.load(f)
  if hf.get('model_type') != 'gpt2':
    raise ExportError(f"{config_path} has model_type={hf.get('model_type')!r}, not 'gpt2'")
  if hf.get('activation_function', 'gelu_new') not in _TANH_GELUS:
    raise ExportError(
      f'activation_function={hf.get("activation_function")!r}: only the tanh GELU '
      f'({", ".join(_TANH_GELUS)}) is supported'
    )
  for flag in ('scale_attn_by_inverse_layer_idx', 'reorder_and_upcast_attn'):
    if hf.get(flag):
      raise ExportError(f'{flag}=True is not supported')
  run = workdir_lib.Workdir(workdir)
  checkpoints = run.checkpoint_dir
  if os.path.isdir(checkpoints) and os.listdir(checkpoints):
    if not overwrite:
      raise ExportError(f'{workdir} already has checkpoints; pass --overwrite to replace them')
    shutil.rmtree(checkpoints)
  config = files.config_for_import(path, config, 'train')
  n_positions, d = int(hf.get('n_positions', 1024)), int(hf['n_embd'])
  config.model.update(
    kind='decoder',
    vocab_size=int(hf['vocab_size']),
    num_layers=int(hf['n_layer']),
    d_model=d,
    num_heads=int(hf['n_head']),
    d_ff=int(hf.get('n_inner') or 4 * d),
    pre_norm=True,
    positional='learned',
    activation='gelu',
    use_bias=True,
    scale_embeddings=False,
    share_embeddings=True,
    scan_layers=False,
    dropout_rate=float(hf.get('resid_pdrop', 0.1)),
  )
  config.max_length = min(int(config.max_length), n_positions)
  config.packed_inputs_length = config.packed_targets_length = n_positions  # the position table's size
  tensors, _ = read_safetensors(weights)
  params = from_gpt2_state_dict(tensors, config.model.num_layers, config.model.num_heads)
  os.makedirs(run.path, exist_ok=True)
  run.write_checkpoint(config, params, step=0)
  spm_path = os.path.join(path, files.TOKENIZER_NAME)
  if os.path.exists(spm_path):
    shutil.copyfile(spm_path, run.tokenizer_path)
  return int(sum(np.prod(x.shape) for x in _leaves(params)))


def _leaves(tree):
  for v in tree.values():
    yield from (_leaves(v) if isinstance(v, dict) else [v])
