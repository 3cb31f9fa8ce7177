"""The CLI's commands: a table (COMMANDS) of name -> summary, flags, body. cli.py parses argv and runs one.

Adding a command is one entry: a function that defines its flags, one that runs it (a few lines over the library
modules, which are imported inside the body so that `--help` and flag errors stay fast), and the checks it needs
(Command.flag_checks, Command.checks, Command.reads). Flags are defined here without importing jax, and their values
(FLAG_RULES and flag_checks), config values and paths (checks) are checked before jax is imported or a checkpoint
opened: a bad flag is refused in a fraction of a second, nothing written. What goes wrong later is a UserError
(errors.py): one line and its exit code.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import textwrap
from typing import Any
from collections.abc import Callable

from absl import flags
from ml_collections import config_flags

from transformer_jax import errors as error_lib

FLAGS = flags.FLAGS


def repo_root() -> str:
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_config_path(name: str = 'tiny.py') -> str:
  """configs/<name> relative to the working directory, else beside the installed (editable) package."""
  local = os.path.join('configs', name)
  return local if os.path.exists(local) else os.path.join(repo_root(), 'configs', name)


def _common_flags(config_default: str | None, fv: flags.FlagValues, argv: list[str] | None) -> None:
  config_flags.DEFINE_config_file(
    'config',
    config_default,
    'Python config file with get_config() -> ConfigDict; override keys with --config.key=value.'
    + (
      ' On a workdir that holds a checkpoint, the default is the config stored with it, the overrides applied on '
      'top (architecture changes refused).'
      if config_default
      else " Default: the config stored in the workdir's checkpoint."
    ),
    flag_values=fv,
    lock_config=True,
    sys_argv=argv,
  )
  flags.DEFINE_string(
    'workdir',
    None,
    'Run directory (checkpoints, tokenizer, TensorBoard, curves.png). Default for train: runs/<config file name>.',
    flag_values=fv,
  )


def _distributed_flags(flags) -> None:
  flags.DEFINE_string(
    'coordinator_address',
    None,
    'host:port of process 0 for multi-process runs; auto-detected on Cloud TPU VMs and SLURM.',
  )
  flags.DEFINE_integer('num_processes', None, 'Number of processes (with --coordinator_address).')
  flags.DEFINE_integer('process_id', None, "This process's index (with --coordinator_address).")


def _decoding_flags(flags, evaluate: bool) -> None:
  flags.DEFINE_integer(
    'beam_size',
    4,
    'Beam width (the paper: 4); 1 = greedy decoding.'
    + (
      ' With a beam > 1, greedy metrics are reported too (keys *_greedy, after the beam '
      "search's bleu= chrf= exact_match=)."
      if evaluate
      else ''
    ),
  )
  flags.DEFINE_float(
    'alpha',
    0.6,
    'GNMT length penalty for beam search: a hypothesis scores '
    'log P / ((5+len)/6)^alpha (the paper: 0.6). Outputs are at most source length + 50 tokens, '
    "capped at the config's max_length.",
  )
  flags.DEFINE_enum(
    'length_penalty',
    'gnmt',
    ['gnmt', 'hf'],
    'Beam search length penalty: gnmt ((5+len)/6)^alpha, '
    "or hf: len^alpha with transformers' stopping heuristic (generate(num_beams=W, length_penalty="
    'alpha) of a released model: pass --alpha=1.0, its default).',
  )
  flags.DEFINE_integer('batch_size', 64, 'Sentences decoded at once.')


# quantize.QUANTIZE_CHOICES, quantize.WEIGHTS_DTYPES and model config.KV_CACHE_DTYPES, here so that defining the
# flags imports no jax; a test keeps them equal.
QUANTIZE_CHOICES = ('none', 'int8')
WEIGHTS_DTYPES = ('float32', 'bfloat16')
KV_CACHE_DTYPES = ('auto', 'float32', 'bfloat16', 'int8')


def _weights_flags(flags) -> None:
  flags.DEFINE_enum(
    'quantize',
    'none',
    list(QUANTIZE_CHOICES),
    'int8: every matmul kernel and the embedding stored as '
    'symmetric per-output-channel int8 (scale max|w|/127) after loading and multiplied in int8 '
    '(int8 x int8 -> int32, activations quantized per token). Norms, biases and positions stay float32.',
  )
  flags.DEFINE_enum(
    'weights_dtype',
    'float32',
    list(WEIGHTS_DTYPES),
    'Dtype those weights are stored in after '
    'loading (bfloat16: half the bytes; with --quantize=int8, the int8 weights dequantized to '
    "bfloat16, which measures their quality, not int8 speed). The activations keep the config's model.dtype.",
  )
  flags.DEFINE_enum(
    'kv_cache_dtype',
    'auto',
    list(KV_CACHE_DTYPES),
    "Decoding's self-attention key/value cache (auto: the compute dtype; int8: one scale per token and head).",
  )


def _evaluate_flags(flags) -> None:
  _decoding_flags(flags, evaluate=True)
  _weights_flags(flags)
  flags.DEFINE_string('split', None, "Held-out split to score (default: the config's eval_split).")


def _translate_flags(flags) -> None:
  _decoding_flags(flags, evaluate=False)
  _weights_flags(flags)
  flags.DEFINE_string(
    'input',
    None,
    'File of sentences, one per line (default: stdin); writes one translation '
    'per line, in input order (a progress bar on stderr for files). Empty lines give empty '
    "translations; inputs longer than the config's max_length tokens are truncated; "
    'characters outside the vocabulary become <unk>.',
  )


def _average_flags(flags) -> None:
  flags.DEFINE_integer(
    'last', 5, 'Average the parameters of the newest N checkpoints (the paper: 5 for base, 20 for big).'
  )
  flags.DEFINE_string(
    'out',
    None,
    'New workdir to write: checkpoints/<newest step> with the mean parameters '
    '(optimizer state and step copied from the newest checkpoint), spm.model, averaged.json.',
  )
  flags.mark_flag_as_required('out')


# export.FORMATS' names and whether each writes a directory, here so that defining (and checking) export's flags
# imports no jax; a test keeps the two equal.
EXPORT_FORMATS = {
  'safetensors': False,
  'msgpack': False,
  'hf-marian': True,
  'stablehlo': False,
  'hf-gpt2': True,
  'ctranslate2': True,
}


def _export_flags(flags) -> None:
  flags.DEFINE_enum('format', None, list(EXPORT_FORMATS), 'Format to write (listed below).')
  flags.DEFINE_string(
    'out',
    None,
    'File to write (a directory for the formats that write one: '
    + ', '.join(n for n, directory in EXPORT_FORMATS.items() if directory)
    + ').',
  )
  flags.DEFINE_string(
    'checkpoint',
    None,
    'Step number or step directory (WORKDIR/checkpoints/STEP) to export (default: the newest good checkpoint).',
  )
  flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Stored parameter dtype (not for stablehlo).')
  flags.DEFINE_list('platforms', ['cpu', 'cuda', 'tpu'], 'stablehlo: platforms to lower for.')
  flags.DEFINE_boolean(
    'overwrite', False, 'Replace existing files (for directory formats: write into a non-empty directory).'
  )
  flags.mark_flags_as_required(['format', 'out'])


def _export_help() -> str:
  from transformer_jax import export  # (jax: only for this --help)

  return 'formats:\n' + '\n'.join(f'  {name}: {module.SUMMARY}' for name, module in export.FORMATS.items())


def _import_flags(flags) -> None:
  flags.DEFINE_enum('format', 'hf-marian', ['hf-marian', 'hf-gpt2'], 'Format of --path.')
  flags.DEFINE_string(
    'path',
    None,
    'HF directory to convert into a checkpoint in --workdir: Marian (config.json, '
    'model.safetensors, source.spm, vocab.json) or GPT-2 (config.json, model.safetensors).',
  )
  flags.DEFINE_boolean('overwrite', False, 'Replace checkpoints already in --workdir.')
  flags.mark_flag_as_required('path')


def _info_flags(flags) -> None:
  flags.DEFINE_integer('num_devices', None, 'Devices to plan the mesh for (default: the devices present).')


def _workdir() -> str:
  if FLAGS.workdir:
    return FLAGS.workdir
  path = config_flags.get_config_filename(FLAGS['config']) or 'tiny.py'
  name = os.path.splitext(os.path.basename(path))[0]  # runs/<config name>
  return os.path.join('runs', name)


class _Definer:
  """The absl `flags` module with flag_values bound: the define_flags functions take it as `flags`."""

  def __init__(self, fv: flags.FlagValues):
    self._fv = fv

  def __getattr__(self, name: str):
    function = getattr(flags, name)
    if name.startswith(('DEFINE', 'mark_')):
      return functools.partial(function, flag_values=self._fv)
    return function


def define_flags(command: str, fv: flags.FlagValues = FLAGS, argv: list[str] | None = None) -> list[str]:
  """Defines the flags of `command` on fv: the shared ones (--config, --workdir), then the command's own.
  argv: the command line whose --config.key=value overrides become flags (default sys.argv). Returns their names."""
  spec = COMMANDS[command]
  before = set(fv)
  _common_flags(default_config_path() if spec.default_config else None, fv, argv)
  definer = _Definer(fv)
  if spec.distributed:
    _distributed_flags(definer)
  if spec.define_flags is not None:
    spec.define_flags(definer)
  flags.mark_flags_as_required(['workdir'] if spec.requires_workdir else [], flag_values=fv)
  return [name for name in fv if name not in before and not name.startswith('config.')]


def _flag_line(flag) -> str:
  parser = getattr(flag, 'parser', None)
  choices = getattr(parser, 'enum_values', None)
  text = flag.help
  if flag.flag_type() == 'bool':
    name = f'--[no]{flag.name}'
  elif choices:
    name = f'--{flag.name}=<{"|".join(choices)}>'
    text = text.removeprefix(f'<{"|".join(choices)}>: ')  # absl's enum help starts with the choices: once is enough
  else:
    name = f'--{flag.name}'
  default = '' if flag.default is None or flag.name == 'config' else f' (default: {flag.default_as_str})'
  text = f'{name}: {text}{default}'
  return textwrap.fill(text, width=118, initial_indent='  ', subsequent_indent='      ')


def help_text(command: str, names: list[str], fv: flags.FlagValues = FLAGS) -> str:
  """What `transformer-jax COMMAND --help` prints: every flag the command defined (names), then its notes."""
  lines = [_flag_line(fv[name]) for name in names]
  lines += ['  -v 0 (or --verbosity=0): INFO logs, and the warnings of the libraries underneath (orbax, gcsfs).']
  extra = COMMANDS[command].help_extra
  return '\n'.join(lines) + (f'\n\n{extra()}' if extra is not None else '')


def _finite(v) -> bool:
  return v is not None and math.isfinite(v)


# Every numeric flag any command takes: (good value?, what it must be). A command's flags are checked before jax is
# imported, so a bad value is refused at once.
FLAG_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
  'beam_size': (lambda v: v >= 1, 'an integer >= 1 (1: greedy decoding)'),
  'batch_size': (lambda v: v >= 1, 'an integer >= 1'),
  'alpha': (_finite, 'a finite number'),
  'max_new_tokens': (lambda v: v >= 1, 'an integer >= 1'),
  'temperature': (lambda v: _finite(v) and v >= 0, 'a finite number >= 0 (0: greedy)'),
  'top_k': (lambda v: v >= 0, 'an integer >= 0 (0: all tokens)'),
  'top_p': (lambda v: _finite(v) and 0 < v <= 1, 'a number in (0, 1]'),
  'seed': (lambda v: v >= 0, 'an integer >= 0'),
  'last': (lambda v: v >= 1, 'an integer >= 1'),
  'num_devices': (lambda v: v is None or v >= 1, 'an integer >= 1'),
  'max_tokens': (lambda v: v >= 1, 'an integer >= 1'),
  'num_slices': (lambda v: v >= 1, 'an integer >= 1'),
  'num_processes': (lambda v: v is None or v >= 1, 'an integer >= 1'),
  'process_id': (lambda v: v is None or v >= 0, 'an integer >= 0'),
}


def flag_errors(command: str, names: list[str], fv: flags.FlagValues = FLAGS) -> list[str]:
  """One line per bad flag value of `command` (names: its flags), without importing jax: FLAG_RULES, then the
  command's own flag_checks."""
  errors = [
    f'--{name}={fv[name].value}: must be {what}'
    for name, (good, what) in FLAG_RULES.items()
    if name in names and fv[name].value is not None and not good(fv[name].value)
  ]
  return errors + _lines(check(fv) for check in COMMANDS[command].flag_checks)


def _text_or_input(fv: flags.FlagValues) -> str | None:
  if fv['text'].value is not None and fv['input'].value is not None:
    return '--text and --input: give one of them'
  if not (fv['text'].value or '').strip() and fv['input'].value is None:
    return "--text='...' (a sentence) or --input=FILE is needed"
  return None


def _known_programs(fv: flags.FlagValues) -> str | None:
  from transformer_jax.tpu import compile as tpu_compile  # (no jax at import)

  unknown = [p for p in fv['programs'].value if p not in tpu_compile.PROGRAMS]
  if unknown:
    return f'--programs: unknown {", ".join(unknown)}; expected some of {", ".join(tpu_compile.PROGRAMS)}'
  return None


def _lines(results) -> list[str]:
  """The error lines of some checks' results (each None, one line, or a list of lines)."""
  lines = []
  for result in results:
    lines += [result] if isinstance(result, str) else list(result or ())
  return [line for line in lines if line]


def input_errors(command: str) -> list[str]:
  """One line per bad config value or path of `command` (its Command.checks), without importing jax."""
  return _lines(check() for check in COMMANDS[command].checks)


# Checks of config values and paths (Command.checks): each returns None, one line or a list of lines.


def _config_values(platform: bool = False, lengths: bool = False) -> Callable[[], list[str]]:
  """config_checks' refusals of --config. platform: the model must run on this host as configured (only train runs
  it so: the readers swap splash for blockwise off TPU, workdir.py). lengths: training lengths fill whole attention
  blocks (train and the commands that plan or prepare it; inference lengths may be padded)."""

  def check() -> list[str]:
    if FLAGS.config is None:
      return []
    from transformer_jax import config_checks

    errors = config_checks.config_errors(FLAGS.config, platform_checks=platform, length_checks=lengths)
    return errors + [
      config_checks.directory_error(FLAGS.config.get(key), f'--config.{key}')
      for key in ('data_dir', 'prepared_data_dir')
    ]

  return check


def _directory(flag: str, value: Callable[[], str | None] | None = None) -> Callable[[], str | None]:
  """--flag (or value()) names a directory, or a place for one."""

  def check() -> str | None:
    from transformer_jax import config_checks

    return config_checks.directory_error(value() if value is not None else FLAGS[flag].value, f'--{flag}')

  return check


def _supported_path(flag: str) -> Callable[[], str | None]:
  """--flag is a path of a kind the project reads and writes (storage/paths.py); what it names is checked later."""

  def check() -> str | None:
    from transformer_jax.storage import paths

    return paths.check(FLAGS[flag].value, f'--{flag}')

  return check


def _has_checkpoint(unless: Callable[[], bool] = lambda: False) -> Callable[[], str | None]:
  """A local --workdir holds checkpoints (the message Workdir gives, before jax is imported to get there)."""

  def check() -> str | None:
    from transformer_jax import config_checks

    workdir = FLAGS.workdir
    if not workdir or '://' in workdir or config_checks.directory_error(workdir, '--workdir') or unless():
      return None
    from transformer_jax.storage import layout as layout_lib

    checkpoints = layout_lib.WorkdirLayout.at(workdir).checkpoints
    return None if os.path.isdir(checkpoints) else f'no checkpoint in {checkpoints}: train first'

  return check


def _checkpoint_is_a_step_directory() -> bool:
  return bool(FLAGS.checkpoint) and not str(FLAGS.checkpoint).isdigit()


def _input_file() -> list[str | None]:
  from transformer_jax import config_checks

  missing = FLAGS.input and '://' not in FLAGS.input and not os.path.exists(FLAGS.input)
  return [
    config_checks.file_error(FLAGS.input, '--input'),
    f'--input={FLAGS.input} does not exist' if missing else None,
  ]


def _out_directory_exists() -> str | None:
  out_dir = os.path.dirname(os.path.abspath(FLAGS.out))
  return None if os.path.isdir(out_dir) else f'--out={FLAGS.out}: directory {out_dir} does not exist'


def _reads(*names: str) -> Callable[[], tuple[str | None, ...]]:
  """Command.reads: the flags that name what the command reads, and the config's data_dir."""
  return lambda: (
    tuple(FLAGS[name].value for name in names) + (FLAGS.config.get('data_dir') if FLAGS.config is not None else None,)
  )


def _export_probe() -> str:
  """A one-file export's gs:// probe object goes beside the file, not under it."""
  from transformer_jax.storage import paths

  return os.path.dirname(FLAGS.out.rstrip('/')) if paths.is_gcs(FLAGS.out) else FLAGS.out


def _refuse(errors: list[str]) -> None:
  """Bad flags, config values or paths: one line each and exit 2, before jax is imported or anything read."""
  for e in errors:
    print(f'error: {e}', file=sys.stderr)
  if errors:
    sys.stderr.flush()
    sys.exit(error_lib.REFUSED)


def run(command: str, args, names: list[str] | None = None) -> None:
  """Runs `command` on the parsed FLAGS. names: the flags define_flags defined (default: every FLAG_RULES flag
  FLAGS holds). A UserError (or a library error errors.py translates) is one `error:` line and its exit code."""
  if len(args) > 1:
    _refuse([f'unexpected arguments {args[1:]}; flags take the form --name=value'])
  _refuse(flag_errors(command, names if names is not None else [n for n in FLAG_RULES if n in FLAGS]))
  _refuse(input_errors(command))
  from transformer_jax.training import faults

  faults.divert_library_errors()
  spec = COMMANDS[command]
  try:
    if spec.distributed:
      from transformer_jax import parallel  # (jax)

      parallel.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    _check_buckets(spec)  # a missing or unwritable bucket: one line before any data is loaded
    with _writer_lock(spec):  # before the slow imports: a second writer is refused at once
      spec.run()
  except Exception as e:
    error = error_lib.from_library_error(e)
    if error is None:
      raise
    print(f'error: {error.line}', file=sys.stderr, flush=True)
    if error.quiet_shutdown:
      faults.send_stderr_to_detail_log()
    sys.exit(error.exit_code)


def _check_buckets(spec: Command) -> None:
  """gs:// paths: the bucket exists (Command.reads) and takes a probe object (Command.probe), else
  paths.BucketError."""
  from transformer_jax.storage import paths

  written = spec.probe() if spec.probe is not None else spec.writes() if spec.writes is not None else None
  for p in spec.reads():
    if paths.is_gcs(p) and p != written:
      paths.check_bucket(p)
  if paths.is_gcs(written):
    paths.check_bucket(written, writable=True)


def _writer_lock(spec: Command):
  """The commands that write a workdir (Command.writes) take its lock (storage/lock.py); readers take none."""
  import contextlib

  if spec.writes is None:
    return contextlib.nullcontext()
  import jax
  from transformer_jax.storage import lock as workdir_lock

  return workdir_lock.lock_workdir(
    spec.writes(), 'transformer-jax ' + ' '.join(sys.argv[1:]), process_index=jax.process_index()
  )


def _run_config(workdir: str | None):
  """--config=FILE when given; else, on a workdir with a checkpoint, its stored config + the --config.key=value
  overrides (run_config.py); else the default config."""
  from transformer_jax import run_config

  flag = FLAGS['config']
  return run_config.resolve(
    workdir, FLAGS.config, explicit=bool(flag.present), overrides=config_flags.get_override_values(flag)
  )


def _train() -> None:
  from transformer_jax.training import train as train_lib
  from transformer_jax.storage import layout as layout_lib
  import jax

  workdir = layout_lib.WorkdirLayout.at(_workdir())  # resolved here, once: its files' paths come from the layout
  final = train_lib.train_and_evaluate(_run_config(workdir), workdir)
  if jax.process_index() == 0 and 'preempted' not in final:
    print('final: ' + ' '.join(f'{k}={v}' if k == 'step' else f'{k}={v:.4f}' for k, v in final.items()), flush=True)


def _compile_flags(flags) -> None:
  # Compiling for TPU runs on the CPU: before any jax import picks a backend (with libtpu installed it would try
  # to open a TPU).
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  from transformer_jax.tpu import compile as tpu_compile  # (no jax at import)

  tpu_compile.define_flags(flags)


def _compile() -> None:
  from transformer_jax import host
  from transformer_jax.tpu import compile as tpu_compile

  try:
    topology = tpu_compile.parse_topology(FLAGS.topology)
  except ValueError:
    topology = None  # tpu_compile.run says what is wrong with it
  # Before libtpu loads: on a host without a TPU, say so (else libtpu prints several lines of errors).
  if topology is not None:
    for name, value in host.libtpu_host_env(topology.chip.name, topology.chips * topology.chip.cores_per_chip).items():
      os.environ.setdefault(name, value)
  tpu_compile.run(FLAGS)


def _info() -> None:
  from transformer_jax import info

  info.print_info(FLAGS.config, num_devices=FLAGS.num_devices)


def _evaluate() -> None:
  from transformer_jax.inference import translate as inference
  from transformer_jax.inference import lm_inference

  config = _run_config(FLAGS.workdir)
  if lm_inference.is_language_model_workdir(FLAGS.workdir, config):
    results = lm_inference.evaluate_workdir(
      FLAGS.workdir, config, split=FLAGS.split, quantize=FLAGS.quantize, weights_dtype=FLAGS.weights_dtype
    )
    print(f'eval_nll={results["eval_nll"]:.4f} eval_accuracy={results["eval_accuracy"]:.4f}')
    print(f'perplexity={results["perplexity"]:.4f} bits_per_byte={results["bits_per_byte"]:.4f}', flush=True)
    return
  results = inference.evaluate_workdir(
    FLAGS.workdir,
    config,
    split=FLAGS.split,
    beam_size=FLAGS.beam_size,
    alpha=FLAGS.alpha,
    batch_size=FLAGS.batch_size,
    length_penalty=FLAGS.length_penalty,
    quantize=FLAGS.quantize,
    weights_dtype=FLAGS.weights_dtype,
    kv_cache_dtype=FLAGS.kv_cache_dtype,
  )
  print(' '.join(f'{k}={v:.4f}' for k, v in results.items()), flush=True)


def _translate() -> None:
  from transformer_jax.inference import translate as inference
  from transformer_jax.storage import paths

  if FLAGS.input:
    if not paths.exists(FLAGS.input):
      raise FileNotFoundError(f'--input={FLAGS.input} does not exist')
    lines = paths.read_text(FLAGS.input).splitlines()
  else:
    lines = sys.stdin.read().splitlines()
  for line in inference.translate_workdir(
    FLAGS.workdir,
    _run_config(FLAGS.workdir),
    lines,
    beam_size=FLAGS.beam_size,
    alpha=FLAGS.alpha,
    batch_size=FLAGS.batch_size,
    progress=bool(FLAGS.input),
    length_penalty=FLAGS.length_penalty,
    quantize=FLAGS.quantize,
    weights_dtype=FLAGS.weights_dtype,
    kv_cache_dtype=FLAGS.kv_cache_dtype,
  ):
    sys.stdout.write(line + '\n')
  sys.stdout.flush()


def _export() -> None:
  from transformer_jax import export
  from transformer_jax.storage import layout as layout_lib

  workdir = layout_lib.WorkdirLayout.at(FLAGS.workdir)
  export.check_target(
    FLAGS.format,
    FLAGS.out,
    dtype=FLAGS.dtype,
    overwrite=FLAGS.overwrite,
    tokenizer_path=workdir.tokenizer,
  )
  from transformer_jax.storage import paths

  if paths.exists(workdir.tokenizer):  # damaged: one line, before any work
    from transformer_jax.inference import workdir as workdir_lib

    workdir_lib.Workdir(workdir).tokenizer()
  source = export.load_checkpoint(FLAGS.workdir, FLAGS.checkpoint, FLAGS.config)
  written = export.export(
    source, FLAGS.format, FLAGS.out, dtype=FLAGS.dtype, overwrite=FLAGS.overwrite, platforms=tuple(FLAGS.platforms)
  )
  print(f'exported step {source.step} as {FLAGS.format}: {", ".join(written)}', flush=True)


def _import() -> None:
  from transformer_jax import export

  config = FLAGS.config
  from transformer_jax.storage import paths

  gpt2 = FLAGS.format == 'hf-gpt2'
  source = paths.local_copy(FLAGS.path)  # gs://: downloaded once (the HF loaders read local files)
  if config is None and not os.path.exists(os.path.join(source, 'transformer_jax_config.json')):
    # data, lengths and optimizer HF does not describe: the default job of this kind
    config = _load_config_file(default_config_path('lm_tiny.py' if gpt2 else 'tiny.py'))
  if gpt2:
    count = export.hf_gpt2.import_gpt2(source, FLAGS.workdir, config=config, overwrite=FLAGS.overwrite)
  else:
    count = export.import_hf_marian(source, FLAGS.workdir, config=config, overwrite=FLAGS.overwrite)
  print(f'imported {FLAGS.path} ({count} parameters) -> {FLAGS.workdir} (step 0)', flush=True)


def _average() -> None:
  import jax
  from transformer_jax.inference import workdir as workdir_lib

  result = workdir_lib.average_workdir(FLAGS.workdir, FLAGS.out, last=FLAGS.last, config=FLAGS.config)
  if jax.process_index() == 0:
    print(
      f'averaged steps {",".join(map(str, result["steps"]))} -> {result["out"]} (step {result["step"]}; '
      f'optimizer state copied from step {result["step"]})',
      flush=True,
    )


def _attention_flags(flags) -> None:
  flags.DEFINE_string('text', None, 'Sentence to translate and show (or --input).')
  flags.DEFINE_string(
    'input',
    None,
    'File with a few sentences, one per line (the first few non-empty ones are drawn, all go into --json).',
  )
  flags.DEFINE_string('out', 'attention.png', 'PNG to write.')
  flags.DEFINE_string('json', None, 'Also write the raw weights (every selected layer and head, uncut) here.')
  flags.DEFINE_integer('beam_size', 1, 'Beam width for the translation; 1 = greedy decoding.')
  flags.DEFINE_float('alpha', 0.6, 'GNMT length penalty for beam search.')
  flags.DEFINE_list('layers', None, 'Layers to show, 1-based (default: all).')
  flags.DEFINE_list('heads', None, 'Heads to show, 1-based (default: all).')
  flags.DEFINE_integer(
    'max_tokens', 40, 'Longer sentences are cut to their first N tokens in the picture (with a note; --json keeps all).'
  )


def _attention() -> None:
  from transformer_jax.inference import attention_maps

  attention_maps.run(FLAGS)


def _prepare_flags(flags) -> None:
  flags.DEFINE_string('split', None, "Split to prepare (default: the config's train_split).")


def _prepare() -> None:
  from transformer_jax.data import prepare

  from transformer_jax.storage import layout as layout_lib

  prepare.run(FLAGS.config, layout_lib.WorkdirLayout.at(_workdir()), split=FLAGS.split)


def _generate_flags(flags) -> None:
  flags.DEFINE_string(
    'prompt',
    None,
    'Prompt to continue (default: one prompt per line of stdin; write \\n for a newline inside --prompt).',
  )
  flags.DEFINE_integer(
    'max_new_tokens',
    64,
    "Most tokens generated per prompt (stops earlier at EOS; at most the model's context less one).",
  )
  flags.DEFINE_float('temperature', 0.8, 'Softmax temperature; 0 = greedy.')
  flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens only (0: all).')
  flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling: the smallest set of tokens whose probability reaches top_p.')
  flags.DEFINE_integer('seed', 0, 'Random seed: the same seed gives the same samples.')
  flags.DEFINE_boolean('jsonl', False, 'One JSON object per prompt, {"prompt": ..., "completion": ...}.')
  _weights_flags(flags)


def _generate() -> None:
  from transformer_jax.inference import lm_inference

  lm_inference.run(FLAGS)


def _signals_help() -> str:
  from transformer_jax.training import faults

  return faults.SIGNALS_HELP


def _load_config_file(path: str):
  import importlib.util

  spec = importlib.util.spec_from_file_location('default_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@dataclasses.dataclass(frozen=True)
class Command:
  name: str
  summary: str  # the usage line(s) cli.py prints
  run: Callable[[], None]
  define_flags: Callable[[Any], None] | None = (
    None  # the command's own flags, given `flags` (after --config, --workdir)
  )
  default_config: bool = False  # --config defaults to configs/tiny.py (else: the workdir's stored config)
  requires_workdir: bool = True
  distributed: bool = False  # joins jax.distributed (multi-process) before running
  one_heap: bool = False  # a long run of steps: malloc serves every buffer from one heap (hugepages.py)
  writes: Callable[[], str] | None = None  # the directory this command writes (locked for its life); None: a reader
  help_extra: Callable[[], str] | None = None  # what --help prints after the flags
  # Run before jax is imported, each answering None, one line or a list (every line printed, exit 2): checks of the
  # command's own flags given the FlagValues (beside FLAG_RULES), then of its config values and paths.
  flag_checks: tuple[Callable[[flags.FlagValues], str | None], ...] = ()
  checks: tuple[Callable[[], str | list[str | None] | None], ...] = ()
  # What it reads (each gs:// bucket there must exist), and the gs:// place it writes if not `writes` (a probe object
  # must be writable there), checked before any data is loaded.
  reads: Callable[[], tuple[str | None, ...]] = _reads('workdir')
  probe: Callable[[], str | None] | None = None


# What every command that reads a trained workdir checks first.
_READER_CHECKS = (_config_values(), _directory('workdir'), _has_checkpoint())


COMMANDS = {
  c.name: c
  for c in (
    Command(
      'train',
      "train (resumes from WORKDIR's newest good checkpoint); default config configs/tiny.py,\n"
      'default workdir runs/<config name>.\n'
      'Last line: final: step=<int> loss=... bleu=... chrf=... exact_match=...',
      _train,
      default_config=True,
      requires_workdir=False,
      distributed=True,
      one_heap=True,
      writes=lambda: _workdir(),
      help_extra=_signals_help,
      checks=(_config_values(platform=True, lengths=True), _directory('workdir', _workdir)),
      reads=_reads(),
    ),
    Command(
      'prepare',
      'tokenize the training split once into token-id shards (WORKDIR/data; train does it when '
      'missing).\nLast line: prepared: examples=<int> ...',
      _prepare,
      _prepare_flags,
      default_config=True,
      requires_workdir=False,
      writes=lambda: _workdir(),
      checks=(_config_values(lengths=True), _directory('workdir', _workdir)),
      reads=_reads(),
    ),
    Command(
      'evaluate',
      "held-out metrics of WORKDIR's newest checkpoint; last line bleu=<float> chrf=<float> ...\n"
      '(a language model: perplexity=<float> bits_per_byte=<float>)',
      _evaluate,
      _evaluate_flags,
      default_config=True,
      distributed=True,
      checks=_READER_CHECKS,
    ),
    Command(
      'translate',
      'sentences from stdin (or --input=FILE) -> one translation per line',
      _translate,
      _translate_flags,
      default_config=True,
      distributed=True,
      checks=(*_READER_CHECKS, _input_file),
      reads=_reads('workdir', 'input'),
    ),
    Command(
      'generate',
      'language models: continue --prompt (or each line of stdin) over the KV cache',
      _generate,
      _generate_flags,
      checks=_READER_CHECKS,
    ),
    Command(
      'export',
      f'--format={{{",".join(EXPORT_FORMATS)}}} --out=PATH',
      _export,
      _export_flags,
      help_extra=_export_help,
      checks=(
        _config_values(),
        _directory('workdir'),
        _has_checkpoint(unless=_checkpoint_is_a_step_directory),
        _supported_path('out'),  # a file or a directory, by format: the format checks the rest
      ),
      probe=_export_probe,
    ),
    Command(
      'import',
      '--format={hf-marian,hf-gpt2} --path=DIR: an HF checkpoint on disk -> WORKDIR',
      _import,
      _import_flags,
      writes=lambda: FLAGS.workdir,
      checks=(_config_values(), _directory('workdir'), _supported_path('path')),
      reads=_reads('workdir', 'path'),
    ),
    Command(
      'average',
      "--last=N --out=DIR: element-wise mean of the last N checkpoints' parameters",
      _average,
      _average_flags,
      writes=lambda: FLAGS.out,
      checks=(*_READER_CHECKS, _directory('out')),
    ),
    Command(
      'info',
      'architecture, parameter count, mesh and per-device memory plan; last line params=<int>',
      _info,
      _info_flags,
      default_config=True,
      requires_workdir=False,
      checks=(_config_values(lengths=True),),
    ),
    Command(
      'compile',
      '--topology=v5e-16 [--num_slices=N]: compile the train/eval/decoding steps for a TPU slice '
      'on this machine\n(libtpu: the [tpu] extra); per-chip HBM, fits or not (exit 1), collectives, estimated '
      'step time and MFU',
      _compile,
      _compile_flags,
      default_config=True,
      requires_workdir=False,
      flag_checks=(_known_programs,),
      checks=(_config_values(lengths=True), _directory('workdir')),
    ),
    Command(
      'attention',
      "--text='...' --out=attention.png: translate, then draw the attention weights (one PNG, --json raw)",
      _attention,
      _attention_flags,
      flag_checks=(_text_or_input,),
      checks=(*_READER_CHECKS, _input_file, _out_directory_exists),
    ),
  )
}
