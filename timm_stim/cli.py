"""What the command-line entry points share: one-line errors, --model-kwargs, the model-source and data flags."""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

from timm.utils import ParseKwargs

__all__ = ['OneLineArgumentParser', 'UsageError', 'add_eval_data_args', 'add_model_source_args', 'check_cli_args',
           'check_device', 'check_git_revision', 'check_interpolation', 'check_model_kwargs', 'check_output_folder',
           'data_config_overrides', 'eval_data_args', 'interpolation_names', 'name_max', 'one_line',
           'input_step', 'parse_model_kwargs', 'report_error', 'setup_step', 'short_value',
           'MAX_BATCH_SIZE', 'MAX_IMG_SIZE', 'MAX_SEED', 'MAX_WORKERS', 'MIN_IMG_SIZE']

# Bounds shared by every CLI. Lower bounds are what can work at all; upper bounds are generous limits past which a
# value can only be a typo (an extra digit), chosen well above anything timm's own recipes use.
MIN_IMG_SIZE = 8  # smaller inputs leave nothing for a stride-32 network's last stage and for crop augmentation
MAX_IMG_SIZE = 4096  # timm's largest pretrained inputs are 1024 px (SAM); 4096 px is 50 MB per fp32 RGB image
MAX_BATCH_SIZE = 100_000  # per process
MAX_WORKERS = 256  # loader processes per rank
MAX_SEED = 2 ** 32 - 1  # numpy.random.seed's limit (timm seeds numpy with seed + rank)


class UsageError(ValueError):
    """Bad input found before any work (a flag, a file, a config): every CLI prints one line and exits with 2."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse with its errors raised as `UsageError` (one line, exit 2) instead of usage text plus a message."""

    def error(self, message: str):
        raise UsageError(f'{message}; see {self.prog} --help')


def one_line(error: BaseException) -> str:
    """The error's message with all whitespace (newlines from wrapped library messages) folded to single spaces."""
    return ' '.join(str(error).split())


def report_error(error: BaseException, exit_code: int) -> int:
    """Print `error: <message>` as one line on stderr; returns `exit_code` for `main()` to return."""
    print(f'error: {one_line(error)}', file=sys.stderr)
    return exit_code


def parse_model_kwargs(items: Optional[Sequence[str]]) -> Dict[str, Any]:
    """`--model-kwargs key=value ...` read exactly as timm's `ParseKwargs` (train.py's flag) reads them: values are
    Python literals when they parse as one (True, 3, (1, 2)), strings otherwise. A malformed pair is a ValueError
    here, for a one-line error, where the argparse action would fail with a traceback."""
    for item in items or []:
        key, sep, _ = item.partition('=')
        if item and (not sep or not key.isidentifier()):
            raise ValueError(f'--model-kwargs expects key=value pairs, got {item!r}')
    namespace = argparse.Namespace()
    ParseKwargs(option_strings=['--model-kwargs'], dest='model_kwargs')(None, namespace, list(items or []))
    return namespace.model_kwargs


def add_model_source_args(parser: argparse.ArgumentParser) -> None:
    """Flags that name the model of a bare checkpoint (run folders and exports name their own)."""
    group = parser.add_argument_group('model (bare checkpoints; run folders and exports name their own)')
    group.add_argument('--model', default=None, help='timm architecture of bare checkpoints (e.g. resnet50)')
    group.add_argument('--num-classes', type=int, default=None, help='classifier size of bare checkpoints')
    group.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                       help='extra timm.create_model kwargs, e.g. dynamic_img_size=True')
    group.add_argument('--checkpoint', default='best',
                       help="checkpoint of a training folder: 'best' (model_best.pth.tar), 'last', or a file name")
    group.add_argument('--use-ema', action='store_true', help='use the EMA weights of the checkpoints')


def add_eval_data_args(parser: argparse.ArgumentParser, batch_size: int = 128, workers: int = 2) -> None:
    """The evaluation-data flags, named as in train_stim.py; None = the training run's value, else the digits."""
    group = parser.add_argument_group("data (same flags as train_stim.py; default: the run's, else digits)")
    group.add_argument('--data-dir', default=None, help='dataset root (none and no --dataset: embedded digits)')
    group.add_argument('--dataset', default=None, help='timm dataset name, e.g. torch/cifar10 or digits')
    group.add_argument('--val-split', default=None, help='validation split (default: validation)')
    group.add_argument('--train-split', default=None, help='training split for BN re-estimation (default: train)')
    group.add_argument('--img-size', type=int, default=None, help='eval image size')
    group.add_argument('--input-size', type=int, nargs=3, default=None, metavar=('C', 'H', 'W'))
    group.add_argument('--crop-pct', type=float, default=None)
    group.add_argument('--mean', type=float, nargs='+', default=None)
    group.add_argument('--std', type=float, nargs='+', default=None)
    group.add_argument('--interpolation', default=None)
    group.add_argument('-b', '--batch-size', type=int, default=batch_size)
    group.add_argument('-j', '--workers', type=int, default=workers)
    group.add_argument('--val-num-samples', type=int, default=None,
                       help='evaluate on a fixed random subset of this many validation images')


def short_value(value: Any, limit: int = 80) -> str:
    """`value` as text for a one-line message, shortened when long (a 10,000-character name stays readable)."""
    text = str(value)
    return text if len(text) <= limit else f'{text[:limit - 20]}... ({len(text)} characters)'


def check_cli_args(args: argparse.Namespace, positive: Sequence[str] = (), non_negative: Sequence[str] = ()) -> None:
    """Ranges of the shared model-source / evaluation-data flags (those present on `args`) plus the given counts;
    raises UsageError naming the first bad flag. Runs before any model or file is touched."""
    def flag(dest: str) -> str:
        return '--' + dest.replace('_', '-')
    checks = [(d, lambda v: v >= 1, 'must be >= 1') for d in ('num_classes', 'batch_size', 'val_num_samples',
                                                                  *positive)]
    checks += [(d, lambda v: v >= 0, 'must be >= 0') for d in ('workers', 'seed', *non_negative)]
    checks += [('img_size', lambda v: v >= MIN_IMG_SIZE, f'must be >= {MIN_IMG_SIZE}'),
               ('img_size', lambda v: v <= MAX_IMG_SIZE, f'must be <= {MAX_IMG_SIZE}'),
               ('input_size', lambda v: 1 <= v[0] <= 4 and min(v[1:]) >= MIN_IMG_SIZE,
                f'must be C H W with H, W >= {MIN_IMG_SIZE}'),
               ('input_size', lambda v: max(v[1:]) <= MAX_IMG_SIZE, f'must have H, W <= {MAX_IMG_SIZE}'),
               ('crop_pct', lambda v: 0 < v <= 1, 'must be in (0, 1]'),
               ('mean', lambda v: len(v) in (1, 3), 'needs 1 or 3 values'),
               ('std', lambda v: len(v) in (1, 3) and min(v) > 0, 'needs 1 or 3 values > 0'),
               ('batch_size', lambda v: v <= MAX_BATCH_SIZE, f'must be <= {MAX_BATCH_SIZE}'),
               ('workers', lambda v: v <= MAX_WORKERS, f'must be <= {MAX_WORKERS} (loader processes)'),
               ('seed', lambda v: v <= MAX_SEED, f'must be <= 2**32-1 = {MAX_SEED} (numpy\'s seed range)')]
    for dest, ok, need in checks:
        value = getattr(args, dest, None)
        if value is None:
            continue
        numbers = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            raise UsageError(f'{flag(dest)} must be a finite number (got {value})')
        if not ok(value):
            raise UsageError(f'{flag(dest)} {need} (got {value})')
    if getattr(args, 'interpolation', None):
        check_interpolation(args.interpolation, '--interpolation')
    if getattr(args, 'device', None):
        check_device(args.device)
    if getattr(args, 'model_kwargs', None):
        check_model_kwargs(parse_model_kwargs(args.model_kwargs))


def check_device(value: str, flag: str = '--device') -> None:
    """`value` names a torch device this machine has (cpu, cuda[:N], mps); raises UsageError otherwise."""
    import torch
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f'{flag} {short_value(value)!r} is not a torch device; use cpu, cuda, cuda:N or mps') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UsageError(f'{flag} {value}: no CUDA GPU is visible; use {flag} cpu')
    if device.type == 'cuda' and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f'{flag} {value}: only {torch.cuda.device_count()} CUDA device(s); use cuda:0 .. cuda:N-1')
    if device.type == 'mps' and not torch.backends.mps.is_available():
        raise UsageError(f'{flag} {value}: MPS is not available; use {flag} cpu')


# ------------------------------------------------------------------------------------------ vocabularies

def interpolation_names() -> Tuple[str, ...]:
    """The interpolation names timm's transforms take (timm.data.transforms' name tables)."""
    from timm.data import transforms as timm_transforms
    table = getattr(timm_transforms, '_str_to_pil_interpolation', None)
    names = tuple(table) if isinstance(table, dict) and table else (
        'nearest', 'bilinear', 'bicubic', 'box', 'hamming', 'lanczos')
    return tuple(n for n in names if _timm_takes_interpolation(n))


def _timm_takes_interpolation(name: str) -> bool:
    from timm.data.transforms import str_to_interp_mode, str_to_pil_interp
    try:
        str_to_interp_mode(name)  # torchvision resize (eval, random-resized crop)
        str_to_pil_interp(name)  # PIL (auto-augment ops)
    except (KeyError, ValueError, TypeError):
        return False
    return True


def check_interpolation(value: str, flag: str, allow_random: bool = False) -> None:
    """`value` is an interpolation timm's transforms take: a name from its tables, 'random' (bilinear or bicubic
    per image) only where timm's training crop takes it. '' (the model's default) is not passed here."""
    if allow_random and value == 'random':
        return
    if not isinstance(value, str) or not _timm_takes_interpolation(value):
        names = ', '.join(interpolation_names()) + (', random' if allow_random else '')
        extra = ' (random is for --train-interpolation only)' if value == 'random' else ''
        raise UsageError(f"{flag} {short_value(value)!s} is not an interpolation timm knows{extra}: use one of "
                         f"{names}, or '' for the model's default")


def check_git_revision(value: str, flag: str = '--hub-revision') -> None:
    """A branch name the Hub (a git server) can take, checked as `git check-ref-format --branch` does."""
    bad = (not value or value.startswith(('-', '/', '.')) or value.endswith(('/', '.', '.lock')) or value == '@'
           or any(s in value for s in ('..', '//', '@{', '/.', '.lock/'))
           or any(c in value for c in ' ~^:?*[\\\x7f') or any(ord(c) < 32 for c in value))
    if bad:
        raise UsageError(f"{flag} {short_value(value)!r} is not a valid branch name: use letters, digits, '-', '_', "
                         f"'.' and '/' (no '..', spaces, '~^:?*[\\', and no leading '-', '.' or '/')")


# timm.create_model keyword arguments common to many architectures, with the type and range each takes: a
# --model-kwargs value of another type is refused here, naming the key, instead of failing deep in a model.
def _number_in(low: float, high: float):
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and low <= v <= high


def _int_at_least(low: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _img_size_ok(v: Any) -> bool:
    sizes = list(v) if isinstance(v, (list, tuple)) else [v]
    return len(sizes) in (1, 2) and all(_int_at_least(1)(s) and s <= MAX_IMG_SIZE for s in sizes)


_RATE = (_number_in(0.0, 1.0), 'a number in [0, 1]')
MODEL_KWARG_TYPES: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    **{k: _RATE for k in ('drop_rate', 'drop_path_rate', 'drop_block_rate', 'attn_drop_rate', 'proj_drop_rate',
                          'pos_drop_rate', 'patch_drop_rate')},
    'bn_momentum': (_number_in(0.0, 1.0), 'a number in [0, 1]'),
    'bn_eps': (lambda v: _number_in(0.0, math.inf)(v) and v > 0, 'a number > 0'),
    'num_classes': (_int_at_least(0), 'an integer >= 0'),
    'in_chans': (_int_at_least(1), 'an integer >= 1'),
    'img_size': (_img_size_ok, f'an integer or (H, W) pair in 1..{MAX_IMG_SIZE}'),
    'patch_size': (_img_size_ok, f'an integer or (H, W) pair in 1..{MAX_IMG_SIZE}'),
    'global_pool': (lambda v: isinstance(v, str), "a pooling name such as 'avg'"),
    **{k: (_is_bool, 'True or False') for k in ('dynamic_img_size', 'dynamic_img_pad', 'strict_img_size',
                                                  'class_token', 'no_embed_class', 'qkv_bias', 'scriptable',
                                                  'exportable', 'features_only', 'pretrained')},
}


def check_model_kwargs(kwargs: Dict[str, Any], owned: Optional[Dict[str, str]] = None) -> None:
    """--model-kwargs values of timm.create_model's common kwargs have the type each takes; keys in `owned` (a
    create_model kwarg -> the flag that already sets it) are refused naming that flag. Raises UsageError."""
    for key, value in (kwargs or {}).items():
        if owned and key in owned:
            takes = f' ({MODEL_KWARG_TYPES[key][1]})' if key in MODEL_KWARG_TYPES else ''
            raise UsageError(f'--model-kwargs {key}={short_value(value)}: timm.create_model\'s {key} is set by '
                             f'{owned[key]}{takes}; use {owned[key]} instead')
        rule = MODEL_KWARG_TYPES.get(key)
        if rule is not None and not rule[0](value):
            raise UsageError(f'--model-kwargs {key}={short_value(value)}: timm.create_model takes {rule[1]} for '
                             f'{key} (got {type(value).__name__} {short_value(value)!r})')


# ------------------------------------------------------------------------------------------ output folders

def name_max(path: str) -> int:
    """The longest file name (in bytes) the file system holding `path` (or its nearest existing ancestor)
    takes: os.pathconf's PC_NAME_MAX, else 255 (ext4, XFS, NTFS, APFS)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return int(os.pathconf(path, 'PC_NAME_MAX')) or 255
    except (OSError, ValueError, AttributeError):
        return 255


def _path_max(path: str) -> int:
    try:
        return int(os.pathconf(path, 'PC_PATH_MAX')) or 4096
    except (OSError, ValueError, AttributeError):
        return 4096


def check_output_folder(folder: str, flag: str = '--output') -> None:
    """`folder` is, or can be created as, a writable folder: its nearest existing ancestor is a writable folder
    and every folder name still to be made fits the file system (NAME_MAX bytes, PATH_MAX in all). Raises
    UsageError otherwise; creates nothing (it only looks at what exists)."""
    path = os.path.abspath(folder)
    missing = []
    while not os.path.exists(path) and os.path.dirname(path) != path:
        missing.append(os.path.basename(path))
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise UsageError(f'{flag} {short_value(folder)}: {path} is a file, not a folder; choose another {flag}')
    limit = name_max(path)
    for name in missing:
        size = len(os.fsencode(name))
        if size > limit:
            raise UsageError(f'{flag} {short_value(folder)}: the folder name {short_value(name, 40)!r} is {size} '
                             f'bytes, longer than this file system allows ({limit}); choose a shorter name')
    total = len(os.fsencode(os.path.abspath(folder)))
    if total >= _path_max(path):
        raise UsageError(f'{flag} {short_value(folder)}: the path is {total} bytes, longer than this system allows '
                         f'({_path_max(path) - 1}); choose a shorter path')
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f'{flag} {short_value(folder)}: cannot write to {path}; choose a writable {flag}')


def eval_data_args(args: argparse.Namespace, run_args: Dict[str, Any]) -> Dict[str, Any]:
    """Dataset flags: the command line, else what the first model's training run used, else digits."""
    def pick(key: str, default: Any) -> Any:
        value = getattr(args, key)
        return value if value is not None else (run_args.get(key) or default)
    dataset = pick('dataset', '')
    data_dir = args.data_dir
    if data_dir is None:
        data_dir = run_args.get('data_dir') or run_args.get('data') or None
    if args.dataset is not None or args.data_dir is not None:  # an explicit dataset: don't mix with the run's
        dataset, data_dir = args.dataset or '', args.data_dir
    return dict(dataset=dataset, data_dir=data_dir, val_split=pick('val_split', 'validation'),
                train_split=pick('train_split', 'train'))


def data_config_overrides(args: argparse.Namespace) -> Dict[str, Any]:
    """Preprocessing flags given on the command line, as a timm data-config overlay."""
    out = {k: getattr(args, k) for k in ('crop_pct', 'interpolation') if getattr(args, k) is not None}
    if args.input_size:
        out['input_size'] = tuple(args.input_size)
    elif args.img_size:
        out['img_size'] = args.img_size
    for key in ('mean', 'std'):
        value = getattr(args, key)
        if value:
            out[key] = tuple(value) * 3 if len(value) == 1 else tuple(value)
    return out


@contextlib.contextmanager
def setup_step(what: str, hint: str = 'check these flags',
               keep: Tuple[type, ...] = (UsageError,)) -> Iterator[None]:
    """Any failure while building `what` from user input is bad input: a one-line UsageError (exit code 2) naming
    it, raised before anything is written. `what` names the flags or files the step reads, e.g.
    '--model resnet18 (--gp bogus)'. Errors of the classes in `keep` (the step's own one-line errors) pass through
    unchanged."""
    try:
        yield
    except keep:
        raise
    except Exception as e:  # noqa: BLE001: set-up only reads input; any failure there is the input's
        raise UsageError(f'{what}: {type(e).__name__}: {one_line(e)[:300]}; {hint}') from None


def input_step(what: str, hint: str):
    """setup_step for the evaluation CLIs, whose loaders already raise one-line ValueError / OSError messages:
    those pass through unchanged; anything else (an AssertionError deep in timm, say) becomes a UsageError."""
    return setup_step(what, hint, keep=(UsageError, ValueError, OSError))
