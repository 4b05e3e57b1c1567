"""What the command-line entry points share: one-line errors, --model-kwargs, the model-source and data flags."""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Dict, Optional, Sequence

from timm.utils import ParseKwargs

__all__ = ['OneLineArgumentParser', 'UsageError', 'add_eval_data_args', 'add_model_source_args', 'check_cli_args',
           'check_output_folder',
           'data_config_overrides', 'eval_data_args', 'one_line', 'parse_model_kwargs', 'report_error']


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


def check_cli_args(args: argparse.Namespace, positive: Sequence[str] = (), non_negative: Sequence[str] = ()) -> None:
    """Ranges of the shared model-source / evaluation-data flags (those present on `args`) plus the given counts;
    raises UsageError naming the first bad flag. Runs before any model or file is touched."""
    def flag(dest: str) -> str:
        return '--' + dest.replace('_', '-')
    checks = [(d, lambda v: v >= 1, 'must be >= 1') for d in ('num_classes', 'batch_size', 'val_num_samples',
                                                                  *positive)]
    checks += [(d, lambda v: v >= 0, 'must be >= 0') for d in ('workers', *non_negative)]
    checks += [('img_size', lambda v: v >= 8, 'must be >= 8'),
               ('input_size', lambda v: 1 <= v[0] <= 4 and min(v[1:]) >= 8, 'must be C H W with H, W >= 8'),
               ('crop_pct', lambda v: 0 < v <= 1, 'must be in (0, 1]'),
               ('mean', lambda v: len(v) in (1, 3), 'needs 1 or 3 values'),
               ('std', lambda v: len(v) in (1, 3) and min(v) > 0, 'needs 1 or 3 values > 0')]
    for dest, ok, need in checks:
        value = getattr(args, dest, None)
        if value is None:
            continue
        numbers = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            raise UsageError(f'{flag(dest)} must be a finite number (got {value})')
        if not ok(value):
            raise UsageError(f'{flag(dest)} {need} (got {value})')


def check_output_folder(folder: str, flag: str = '--output') -> None:
    """`folder` is, or can be created as, a writable folder: its nearest existing ancestor is a writable folder.
    Raises UsageError otherwise; creates nothing."""
    path = os.path.abspath(folder)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise UsageError(f'{flag} {folder}: {path} is a file, not a folder; choose another {flag}')
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f'{flag} {folder}: cannot write to {path}; choose a writable {flag}')


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
