#!/usr/bin/env python3
"""Train a timm model with Stimulative Training (ST, ST++) or plainly (--stim none).

    python train_stim.py --model resnet18          # ST++ on the built-in scikit-learn digits, CPU-friendly
    python train_stim.py -c hparams/resnet50_stpp_in1k.yaml --data-dir /data/imagenet
    torchrun --nproc_per_node=2 train_stim.py -c hparams/resnet50_stpp_in1k.yaml --data-dir /data/imagenet

timm's training recipe rebuilt from timm's library (timm.data, .optim, .scheduler, .loss, .utils) around
`timm_stim.StimulativeTask`. Each step runs the full network and M sampled subnetworks inside ONE forward of the
task and back-propagates `main loss + stim weight * sum(stim losses)` in ONE backward, so DDP does one all-reduce
per step. `--stim none` goes through the same loop without a stimulator. Flags keep timm's names and defaults;
a -c/--config YAML (keys = argparse dest names, like timm's args.yaml) sets the defaults.

Read top to bottom: arguments -> set-up -> train_one_epoch / validate -> checkpoints -> main -> Hub export.
Exit codes: 0 done, 2 bad input (found before anything is written), 1 failure while training or pushing.
"""
import argparse
import difflib
import logging
import os
import random
import shutil
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext
from datetime import datetime
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import yaml

import timm
from timm.data import FastCollateMixup, create_loader, resolve_data_config
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import (AverageMeter, CheckpointSaver, NativeScaler, ParseKwargs, accuracy, dispatch_clip_grad,
                        distribute_bn, get_outdir, init_distributed_device, random_seed, update_summary)

from timm_stim import StimulativeTask, Stimulator, create_stim_config, parse_space, recalibrate_bn, smaller_input_kwargs
from timm_stim.cli import report_error
from timm_stim.data import DIGITS_INFO, DataConfigError, create_dataset_or_digits
from timm_stim.hub import HubPushError, read_checkpoint as hub_read_checkpoint

_logger = logging.getLogger('train_stim')

DIGITS_RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'hparams', 'digits_resnet18.yaml')
RUNTIME_KEYS = ('world_size', 'rank', 'local_rank', 'distributed', 'prefetcher', 'config')  # not flags
CARD_ARGS = ('model', 'dataset', 'epochs', 'batch_size', 'opt', 'lr', 'sched', 'weight_decay')  # always on the card


class UsageError(Exception):
    """Bad input found before any work: printed as `error: <message>`, exit code 2."""


class TrainingDiverged(Exception):
    """A non-finite training loss: printed as `error: <message>`, exit code 1."""


# ---------------------------------------------------------------------------------------------------- arguments

def build_parser() -> argparse.ArgumentParser:
    """All flags. Names and defaults are timm's train.py ones; --stim* and --hub* are timm_stim's."""
    p = argparse.ArgumentParser(
        description='Train a timm model with Stimulative Training (ST / ST++).',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog='Built-in data: with no --data-dir and --dataset "" or "digits", the scikit-learn digits are used '
               '(32 px, 10 classes) and, unless -c is given, defaults come from hparams/digits_resnet18.yaml '
               '(model, epochs, lr, batch size, augmentation); flags on the command line still win.')
    p.add_argument('-c', '--config', default='', metavar='FILE', help='YAML of defaults (keys = dest names)')
    g = p.add_argument_group('Dataset')
    g.add_argument('--data-dir', default=None, help='dataset root; none = built-in digits')
    g.add_argument('--dataset', default='', help='timm dataset name: folder if empty, torch/cifar100, digits, ...')
    g.add_argument('--train-split', default='train')
    g.add_argument('--val-split', default='validation')
    g.add_argument('--train-num-samples', type=int, default=None, help='train on a fixed random subset of N images')
    g.add_argument('--dataset-download', action='store_true', help='allow torchvision datasets to download')
    g.add_argument('--class-map', default='', help='class to index mapping file')
    g = p.add_argument_group('Model')
    g.add_argument('--model', default='resnet50', help='timm model name')
    g.add_argument('--pretrained', action='store_true')
    g.add_argument('--resume', default='', help='resume model, optimizer, samplers and RNGs from this checkpoint')
    g.add_argument('--no-resume-opt', action='store_true', help='do not resume the optimizer state')
    g.add_argument('--num-classes', type=int, default=None, help="default: the model's (10 on digits)")
    g.add_argument('--img-size', type=int, default=None, help='train and eval image size')
    g.add_argument('--input-size', type=int, nargs=3, default=None, metavar='N', help='C H W, overrides --img-size')
    g.add_argument('--crop-pct', type=float, default=None, help='eval centre-crop fraction')
    g.add_argument('--mean', type=float, nargs='+', default=None)
    g.add_argument('--std', type=float, nargs='+', default=None)
    g.add_argument('--interpolation', default='', help='eval resize interpolation')
    g.add_argument('-b', '--batch-size', type=int, default=128, help='per process')
    g.add_argument('-vb', '--validation-batch-size', type=int, default=None)
    g.add_argument('--channels-last', action='store_true')
    g.add_argument('--grad-accum-steps', type=int, default=1)
    g.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, help='create_model kwargs: k=v ...')
    g.add_argument('--torchcompile', nargs='?', const='inductor', default=None, help='torch.compile backend')
    g.add_argument('--torchcompile-mode', default=None, help='torch.compile mode, e.g. max-autotune')
    g = p.add_argument_group('Optimizer')
    g.add_argument('--opt', default='sgd', help='timm optimizer: sgd, nesterov, adamw, lamb, ...')
    g.add_argument('--opt-eps', type=float, default=None)
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--weight-decay', type=float, default=2e-5)
    g.add_argument('--clip-grad', type=float, default=None)
    g.add_argument('--clip-mode', default='norm', help='norm, value or agc')
    g = p.add_argument_group('Learning rate schedule')
    g.add_argument('--sched', default='cosine', help='cosine, step, multistep, plateau, poly, tanh')
    g.add_argument('--sched-on-updates', action='store_true', help='step the schedule every update')
    g.add_argument('--lr', type=float, default=None, help='default: --lr-base scaled to the global batch')
    g.add_argument('--lr-base', type=float, default=0.1)
    g.add_argument('--lr-base-size', type=int, default=256)
    g.add_argument('--lr-base-scale', default='', help="'linear' or 'sqrt' (default: by optimizer)")
    g.add_argument('--warmup-lr', type=float, default=1e-5)
    g.add_argument('--min-lr', type=float, default=0.0)
    g.add_argument('--epochs', type=int, default=300)
    g.add_argument('--start-epoch', type=int, default=None, help='override the epoch to start (or resume) at')
    g.add_argument('--stop-epoch', type=int, default=None, help='end the run after epoch K of the full schedule')
    g.add_argument('--decay-epochs', type=float, default=90)
    g.add_argument('--warmup-epochs', type=int, default=5)
    g.add_argument('--cooldown-epochs', type=int, default=0)
    g.add_argument('--decay-rate', type=float, default=0.1)
    g = p.add_argument_group('Augmentation and regularization')
    g.add_argument('--no-aug', action='store_true')
    g.add_argument('--scale', type=float, nargs=2, default=[0.08, 1.0], help='random-resized-crop area range')
    g.add_argument('--ratio', type=float, nargs=2, default=[3. / 4., 4. / 3.], help='random-resized-crop aspect')
    g.add_argument('--hflip', type=float, default=0.5)
    g.add_argument('--vflip', type=float, default=0.0)
    g.add_argument('--color-jitter', type=float, default=0.4)
    g.add_argument('--aa', default=None, help='auto-augment policy, e.g. rand-m9-mstd0.5-inc1')
    g.add_argument('--reprob', type=float, default=0.0, help='random-erase probability')
    g.add_argument('--remode', default='pixel')
    g.add_argument('--recount', type=int, default=1)
    g.add_argument('--mixup', type=float, default=0.0)
    g.add_argument('--cutmix', type=float, default=0.0)
    g.add_argument('--mixup-prob', type=float, default=1.0)
    g.add_argument('--mixup-switch-prob', type=float, default=0.5)
    g.add_argument('--mixup-mode', default='batch')
    g.add_argument('--mixup-off-epoch', type=int, default=0, help='no mixup from this epoch on (0 = never)')
    g.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    g.add_argument('--bce-loss', action='store_true', help='binary cross-entropy instead of cross-entropy')
    g.add_argument('--train-interpolation', default='random')
    g.add_argument('--drop', type=float, default=0.0, help='dropout')
    g.add_argument('--drop-path', type=float, default=None, help='stochastic depth')
    g.add_argument('--sync-bn', action='store_true')
    g.add_argument('--dist-bn', default='reduce', help="BN stats across ranks each epoch: broadcast, reduce or ''")
    g.add_argument('--model-ema', action='store_true')
    g.add_argument('--model-ema-decay', type=float, default=0.9998)
    g = p.add_argument_group('Stimulative Training (None = the --stim preset\'s value)')
    g.add_argument('--stim', default='st++', choices=['none', 'st', 'st++'], help='preset; none = plain training')
    g.add_argument('--stim-space', default=None, help='st, st++, bernoulli[:p] or a K-list such as 1,2,4,1')
    g.add_argument('--stim-loss', default=None, choices=['kl', 'kl-'], help='kl (ST) or kl- (ST++)')
    g.add_argument('--stim-weight', type=float, default=None, help='lambda per subnet (1)')
    g.add_argument('--stim-temperature', type=float, default=None, help='KL temperature (1)')
    g.add_argument('--stim-amplitude', type=float, default=None, help='A of the KL- standardization (1)')
    g.add_argument('--stim-subnets', type=int, default=None, help='subnets per step, M (1)')
    g.add_argument('--stim-min-scale', type=float, default=None,
                   help='smallest subnet input / image size, in (0, 1] (st++: 0.43, st: 1 = off)')
    g.add_argument('--stim-sizes', type=int, nargs='+', default=None, help='fixed subnet input sizes instead')
    g.add_argument('--stim-bn', default=None, choices=['freeze', 'update'], help='BN running stats in subnet passes')
    g.add_argument('--stim-start-epoch', type=int, default=0, help='train plainly before this epoch')
    g.add_argument('--stim-blocks', nargs='+', default=None, help='residual block module paths (default: found)')
    g.add_argument('--stim-per-rank', action='store_true', help='independent subnets on every rank')
    g.add_argument('--stim-size-fallback', action='store_true', help='full-size subnets if the model needs it')
    g.add_argument('--stim-memory-lean', action='store_true', help='one subnet graph alive at a time')
    g.add_argument('--stim-compile', default='full', choices=['full', 'blocks'],
                   help='with --torchcompile: compile the full-network pass only (subnets eager) or every '
                        'residual block (subnets too; see BENCHMARKS.md)')
    g.add_argument('--stim-bn-recal', type=int, default=0, metavar='N',
                   help='re-estimate BN statistics on N training images before each validation (authors: 2000)')
    g.add_argument('--loafing-eval', type=int, default=0, metavar='N',
                   help='at the end, evaluate the full net and N random ST-space subnets (timm_stim.loafing); '
                        'results in <output>/loafing and, with --push-to-hub, in the model card')
    g = p.add_argument_group('Hugging Face Hub (token from HF_TOKEN or `hf auth login`)')
    g.add_argument('--push-to-hub', action='store_true', help='export a plain timm model at the end and push it')
    g.add_argument('--hub-repo-id', default=None, help='owner/name')
    g.add_argument('--hub-private', action='store_true')
    g.add_argument('--hub-revision', default=None, help='branch to push to')
    g.add_argument('--hub-weights', default='best', choices=['best', 'last', 'ema'])
    g = p.add_argument_group('Misc')
    g.add_argument('--seed', type=int, default=42)
    g.add_argument('--log-interval', type=int, default=50, help='updates between log lines')
    g.add_argument('--recovery-interval', type=int, default=0, help='recovery checkpoint every N batches')
    g.add_argument('--checkpoint-hist', type=int, default=10)
    g.add_argument('-j', '--workers', type=int, default=4)
    g.add_argument('--pin-mem', action='store_true')
    g.add_argument('--output', default='', help='output root; ./output/train if empty')
    g.add_argument('--experiment', default='', help='run folder name; date-time-model-size if empty')
    g.add_argument('--eval-metric', default='top1', choices=['top1', 'top5', 'loss'])
    g.add_argument('--amp', action='store_true', help='mixed precision (autocast)')
    g.add_argument('--amp-dtype', default='float16', choices=['float16', 'bfloat16'])
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    return p


def load_config(path: str, parser: argparse.ArgumentParser) -> dict:
    """Read a YAML of parser defaults; unknown keys and bad choices are errors, not silently ignored."""
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
    except OSError as e:
        raise UsageError(f'cannot read config {path}: {e.strerror}') from None
    except yaml.YAMLError as e:
        raise UsageError(f'config {path} is not valid YAML: {e}') from None
    if not isinstance(cfg, dict):
        raise UsageError(f'config {path} must map argument names to values')
    actions = {a.dest: a for a in parser._actions}
    for key, value in cfg.items():
        if key not in actions and key not in RUNTIME_KEYS:
            close = difflib.get_close_matches(str(key), list(actions), n=1)
            raise UsageError(f'unknown key {key!r} in config {path}' + (f' (did you mean {close[0]!r}?)' if close else
                             "; keys are argument names with '_', e.g. batch_size"))
        if key in actions and actions[key].choices and value not in actions[key].choices:
            raise UsageError(f'{key}: {value!r} in config {path} is not one of {list(actions[key].choices)}')
    return {k: v for k, v in cfg.items() if k not in RUNTIME_KEYS}


def uses_digits(args) -> bool:
    """The built-in default data: no data dir and no dataset (or 'digits')."""
    return args.dataset.lower() == 'digits' or (not args.dataset and not args.data_dir)


def parse_args(argv=None) -> argparse.Namespace:
    """timm's two-stage parse: -c/--config sets defaults, the command line overrides them.

    On the built-in digits without -c, hparams/digits_resnet18.yaml serves as the config.
    """
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument('-c', '--config', default='')
    args_config, remaining = config_parser.parse_known_args(argv)
    parser = build_parser()
    if args_config.config:
        parser.set_defaults(**load_config(args_config.config, parser))
    args = parser.parse_args(remaining)
    args.config, args.digits_recipe = args_config.config, False
    if not args.config and uses_digits(args) and os.path.isfile(DIGITS_RECIPE):
        parser.set_defaults(**load_config(DIGITS_RECIPE, parser))
        args = parser.parse_args(remaining)
        args.config, args.digits_recipe = '', True
    return args


def check_args(args) -> None:
    """Flag values and combinations that cannot work, reported before any work."""
    if args.config and not args.data_dir and not args.dataset:
        raise UsageError(f'{args.config} trains on an image folder: pass --data-dir (or --dataset digits to try it '
                         f'on the built-in digits)')
    for name in ('batch_size', 'epochs', 'grad_accum_steps', 'log_interval'):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    if args.stop_epoch is not None and args.stop_epoch < 1:
        raise UsageError(f'--stop-epoch must be >= 1 (got {args.stop_epoch})')
    if args.stim != 'none':
        if args.stim_min_scale is not None and not 0.0 < args.stim_min_scale <= 1.0:
            raise UsageError(f'--stim-min-scale must be in (0, 1] (got {args.stim_min_scale}); 1 turns smaller '
                             f'subnet inputs off')
        if args.stim_subnets is not None and args.stim_subnets < 1:
            raise UsageError(f'--stim-subnets must be >= 1 (got {args.stim_subnets}); --stim none trains plainly')
        try:
            parse_space(args.stim_space or args.stim)
        except ValueError as e:
            raise UsageError(f'--stim-space: {e}') from None
    if args.loafing_eval < 0:
        raise UsageError(f'--loafing-eval must be >= 0 subnets (got {args.loafing_eval})')
    if args.resume and not os.path.isfile(args.resume):
        raise UsageError(f'--resume checkpoint {args.resume} does not exist')
    if args.push_to_hub:
        from timm_stim.hub import check_can_push, check_repo_id
        if not args.hub_repo_id:
            raise UsageError('--push-to-hub needs --hub-repo-id owner/name')
        if args.hub_weights == 'ema' and not args.model_ema:
            raise UsageError('--hub-weights ema needs --model-ema')
        try:
            check_repo_id(args.hub_repo_id)
            check_can_push()  # offline mode or no token: fail now, not after training
        except (ValueError, HubPushError) as e:
            raise UsageError(str(e)) from None


# ------------------------------------------------------------------------------------------------------- set-up

def create_stim_options(args):
    """StimConfig from --stim and the --stim-* overrides, or None for --stim none.

    The effective values (preset + overrides) are written back into args, so args.yaml records them.
    """
    if args.stim == 'none':
        return None
    flags = dict(space='stim_space', loss='stim_loss', weight='stim_weight', temperature='stim_temperature',
                 amplitude='stim_amplitude', num_subnets='stim_subnets', min_scale='stim_min_scale',
                 sizes='stim_sizes', bn='stim_bn')
    try:
        config = create_stim_config(
            args.stim, per_rank=args.stim_per_rank, seed=args.seed, size_fallback=args.stim_size_fallback,
            memory_lean=args.stim_memory_lean, **{field: getattr(args, flag) for field, flag in flags.items()})
    except ValueError as e:
        raise UsageError(str(e)) from None
    for field, flag in flags.items():
        setattr(args, flag, getattr(config, field) if field != 'sizes' else args.stim_sizes)
    return config


def create_model(args, stim_config):
    """timm.create_model, plus the kwargs a ViT needs for smaller subnet inputs (kept in args.model_kwargs)."""
    name = args.model
    if not (timm.is_model(name) or name.startswith(('hf-hub:', 'local-dir:'))):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise UsageError(f"unknown model {name!r}" + (f" (did you mean {', '.join(close)}?)" if close else '') +
                         f"; list names with python -c \"import timm; print(timm.list_models('*{name}*'))\"")
    kwargs = dict(args.model_kwargs or {})
    if stim_config is not None and (stim_config.min_scale < 1.0 or stim_config.sizes):
        for key, value in smaller_input_kwargs(name).items():
            kwargs.setdefault(key, value)
    args.model_kwargs = kwargs  # recorded in args.yaml, checkpoints and the Hub export's model_args
    try:
        model = timm.create_model(name, pretrained=args.pretrained, num_classes=args.num_classes,
                                  drop_rate=args.drop, drop_path_rate=args.drop_path, **kwargs)
    except TypeError as e:
        raise UsageError(f'cannot create {name} with {kwargs}: {e}') from None
    args.num_classes = model.num_classes
    return model


class _Subset(torch.utils.data.Dataset):
    """A fixed random subset of a map-style dataset that forwards `transform` (set by timm's create_loader)."""

    def __init__(self, dataset, num_samples: int):
        self.dataset = dataset
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
        self.indices = sorted(order[:num_samples].tolist())

    transform = property(lambda self: self.dataset.transform, lambda self, t: setattr(self.dataset, 'transform', t))

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[self.indices[i]]


def create_datasets(args, img_size: int) -> list:
    """Train and validation datasets; a bad data dir / dataset raises DataConfigError before any work."""
    kwargs = dict(img_size=img_size, class_map=args.class_map, download=args.dataset_download,
                  batch_size=args.batch_size, seed=args.seed)
    train = create_dataset_or_digits(args.dataset, args.data_dir, args.train_split, is_training=True,
                                     num_samples=args.train_num_samples, **kwargs)
    val = create_dataset_or_digits(args.dataset, args.data_dir, args.val_split, is_training=False, **kwargs)
    num = args.train_num_samples
    if num and not isinstance(train, torch.utils.data.IterableDataset) and num < len(train):
        train = _Subset(train, num)
    return train, val


def create_loaders(args, data_config, datasets, device, mixup_active: bool):
    """timm's create_loader for train (augmentation, mixup collate) and eval; both normalise on the device."""
    collate_fn = FastCollateMixup(
        mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob, switch_prob=args.mixup_switch_prob,
        mode=args.mixup_mode, label_smoothing=args.smoothing, num_classes=args.num_classes) if mixup_active else None
    common = dict(input_size=data_config['input_size'], mean=data_config['mean'], std=data_config['std'],
                  num_workers=args.workers, distributed=args.distributed, pin_memory=args.pin_mem, device=device)
    loader_train = create_loader(
        datasets[0], batch_size=args.batch_size, is_training=True, no_aug=args.no_aug, re_prob=args.reprob,
        re_mode=args.remode, re_count=args.recount, scale=args.scale, ratio=args.ratio, hflip=args.hflip,
        vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=args.aa,
        interpolation=args.train_interpolation, collate_fn=collate_fn, **common)
    loader_eval = create_loader(
        datasets[1], batch_size=args.validation_batch_size or args.batch_size, is_training=False,
        interpolation=data_config['interpolation'], crop_pct=data_config['crop_pct'], **common)
    if len(loader_train) == 0:
        raise UsageError(f'{len(datasets[0])} training images make no full batch of {args.batch_size} per process')
    return loader_train, loader_eval


def create_criterion(args, mixup_active: bool) -> nn.Module:
    """timm's training loss: soft-target CE under mixup, label smoothing, or BCE."""
    if mixup_active:
        return BinaryCrossEntropy() if args.bce_loss else SoftTargetCrossEntropy()
    if args.smoothing:
        return (BinaryCrossEntropy(smoothing=args.smoothing) if args.bce_loss
                else LabelSmoothingCrossEntropy(smoothing=args.smoothing))
    return BinaryCrossEntropy() if args.bce_loss else nn.CrossEntropyLoss()


# ------------------------------------------------------------------------------------------- training, validation

def train_one_epoch(epoch, task, loader, optimizer, args, device, loss_scaler=None, amp_autocast=nullcontext,
                    lr_scheduler=None, saver=None) -> OrderedDict:
    """One epoch: a forward (full net + subnets) and a backward per batch, an update every grad_accum_steps."""
    task.train()
    accum, num_batches = args.grad_accum_steps, len(loader)
    last_accum = num_batches % accum or accum  # a shorter accumulation at the end of the epoch
    updates_per_epoch = (num_batches + accum - 1) // accum
    num_updates = epoch * updates_per_epoch
    stimulator = task.stimulator if task.stimulator is not None and task.stimulator.enabled else None
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # sample-weighted loss, main loss, stim loss
    count, depth, size = 0, 0.0, 0.0
    step_time, data_time = AverageMeter(), AverageMeter()
    bar = _progress_bar(loader, args, f'Train {epoch}')
    last_log, last_log_updates, end = time.time(), num_updates, time.time()
    for batch_idx, (input, target) in enumerate(bar or loader):
        data_time.update(time.time() - end)
        need_update = batch_idx == num_batches - 1 or (batch_idx + 1) % accum == 0
        steps = last_accum if batch_idx >= num_batches - last_accum else accum
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        if stimulator is not None:  # memory-lean / grad-checkpointed subnet gradients are made inside the forward
            task.set_grad_multiplier((loss_scaler.state_dict()['scale'] if loss_scaler else 1.0) / steps)

        with task.no_sync() if not need_update else nullcontext():  # DDP: all-reduce on the last micro-step only
            with amp_autocast():
                out = task(input, target)
            loss = out['loss'] / steps
            params = task.get_clip_parameters(exclude_head='agc' in args.clip_mode)
            if loss_scaler is not None:
                loss_scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                            parameters=params, need_update=need_update)
            else:
                loss.backward()
                if need_update:
                    if args.clip_grad is not None:
                        dispatch_clip_grad(params, args.clip_grad, mode=args.clip_mode)
                    optimizer.step()

        n = input.shape[0]
        count += n
        sums += torch.stack([out['loss'].detach(), out['main_loss'], out.get('stim_loss', 0 * out['main_loss'])]) * n
        if out['draws']:
            summary = stimulator.depth_summary(out['draws'])
            depth, size = depth + summary['depth_frac'] * n, size + summary['size'] * n
        if saver is not None and args.recovery_interval and (batch_idx + 1) % args.recovery_interval == 0 \
                and torch.isfinite(sums).all():  # as in timm, a recovery checkpoint resumes at the next epoch
            saver.save_recovery(epoch, batch_idx=batch_idx)
        if need_update:
            num_updates += 1
            optimizer.zero_grad(set_to_none=True)
            task.update_ema(step=num_updates)
            if lr_scheduler is not None:
                lr_scheduler.step_update(num_updates=num_updates)
            update_idx = num_updates - epoch * updates_per_epoch - 1
            if update_idx % args.log_interval == 0 or batch_idx == num_batches - 1:
                loss_avg, main_avg, stim_avg = _mean_over_ranks(sums, count, epoch, update_idx, args)
                step_time.update((time.time() - last_log) / (num_updates - last_log_updates))
                last_log, last_log_updates = time.time(), num_updates
                stim_text = (f'Main: {main_avg:.4f}  Stim: {stim_avg:.4f}  Depth: {depth / count:.3f}  '
                             f'Size: {size / count:.1f}  ' if stimulator is not None else '')
                text = (f'Train: {epoch} [{update_idx:>4d}/{updates_per_epoch} '
                        f'({100. * (update_idx + 1) / updates_per_epoch:>3.0f}%)]  Loss: {loss_avg:#.4g}  {stim_text}'
                        f'Step: {step_time.val:.3f}s  {n * accum * args.world_size / step_time.val:>7.1f} img/s  '
                        f'LR: {optimizer.param_groups[0]["lr"]:.3e}  Data: {data_time.avg:.3f}s')
                if args.rank == 0:
                    (bar.write if bar else _logger.info)(text)
        end = time.time()

    loss_avg, main_avg, stim_avg = _mean_over_ranks(sums, count, epoch, updates_per_epoch - 1, args)
    metrics = OrderedDict(loss=loss_avg, main_loss=main_avg, stim_loss=stim_avg)
    if task.stimulator is not None:  # nan before --stim-start-epoch, so summary.csv keeps its columns
        metrics.update(depth_frac=depth / count if stimulator else float('nan'),
                       stim_size=size / count if stimulator else float('nan'))
    return metrics


def _progress_bar(loader, args, desc):
    """A tqdm bar when tqdm is installed and stdout is a terminal (rank 0 only), else None."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True) if args.rank == 0 and sys.stdout.isatty() else None


def _mean_over_ranks(sums, count, epoch, update_idx, args) -> list:
    """Average losses over all ranks (one small all-reduce, at log points only); stop on a non-finite loss.

    Checked before anything is saved, so a checkpoint never holds weights from a diverged run.
    """
    if args.distributed:
        sums = sums.clone()
        torch.distributed.all_reduce(sums)
    means = [s / (count * args.world_size) for s in sums.tolist()]
    if not all(np.isfinite(means)):
        raise TrainingDiverged(
            f'non-finite training loss ({means[0]:.4g}) in epoch {epoch} by update {update_idx + 1}; training stopped, '
            f'the last good checkpoint is kept (last.pth.tar in the output folder, once an epoch has finished); '
            f'lower --lr or use --clip-grad')
    return means


@torch.no_grad()
def validate(model, loader, args, amp_autocast=nullcontext) -> OrderedDict:
    """Loss and top-1/top-5 (%) of the full network on the validation set, summed exactly over ranks."""
    model.eval()
    limit = getattr(loader.sampler, 'num_valid_samples', None) if args.distributed else None  # drop DDP padding
    sums, seen = torch.zeros(4, dtype=torch.float64, device=args.device), 0  # loss, top-1, top-5 hits, samples
    for input, target in loader:
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        with amp_autocast():
            output = model(input)
        output = (output[0] if isinstance(output, (tuple, list)) else output).float()
        if limit is not None:
            output, target = output[:max(0, limit - seen)], target[:max(0, limit - seen)]
        n, seen = output.shape[0], seen + output.shape[0]
        if n:
            top1, top5 = accuracy(output, target, topk=(1, min(5, output.shape[-1])))
            loss = nn.functional.cross_entropy(output, target)
            sums += torch.stack([loss, top1 / 100, top5 / 100, torch.ones_like(loss)]).double() * n
    if args.distributed:
        torch.distributed.all_reduce(sums)
    loss, top1, top5, n = sums.tolist()
    return OrderedDict(loss=loss / max(n, 1), top1=100 * top1 / max(n, 1), top5=100 * top5 / max(n, 1))


# ---------------------------------------------------------------------------------------------------- checkpoints

class AtomicCheckpointSaver(CheckpointSaver):
    """timm's CheckpointSaver with every file it publishes appearing atomically.

    timm writes tmp.pth.tar and os.replace()s it onto last.pth.tar, but first unlinks last.pth.tar (a moment with
    no last checkpoint), never fsyncs, and makes model_best / checkpoint-N by unlink + hardlink. Here the new file
    is fsynced and each target is swapped in by one os.replace: a crash leaves the old or the new complete file.
    """

    def _replace(self, src, dst):
        with open(src, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(src, dst)

    def _duplicate(self, src, dst):
        tmp = dst + '.tmp'
        if os.path.lexists(tmp):
            os.unlink(tmp)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)


class CheckpointContents:
    """Given to CheckpointSaver as its `task`: the task's weights and state, plus the run's `train_state`."""

    def __init__(self, task):
        self.task, self.train_state = task, {}

    def get_checkpoint_state(self, ema=False, **kwargs):
        state = self.task.get_checkpoint_state(ema=ema, **kwargs)
        if not ema:
            state['train_state'] = self.train_state
        return state


def read_checkpoint(path: str) -> dict:
    """Load a training checkpoint safely (weights_only); a truncated or corrupt file is a one-line error."""
    try:
        ckpt = hub_read_checkpoint(path)
    except ValueError as e:
        raise UsageError(f'{e} (truncated or corrupt?)') from None
    if not isinstance(ckpt, dict) or 'state_dict' not in ckpt:
        raise UsageError(f'{path} is not a train_stim / timm training checkpoint (no state_dict)')
    return ckpt


def resume(args, task, optimizer, loss_scaler) -> tuple:
    """Restore weights, subnet samplers, EMA, optimizer and scaler from --resume, writing nothing.

    Returns (epoch to start at, the checkpoint's train_state with every rank's RNG states).
    """
    ckpt = read_checkpoint(args.resume)
    state_dict = {k[7:] if k.startswith('module.') else k: v for k, v in ckpt['state_dict'].items()}
    expected = task.model.state_dict()
    bad = ([f'missing {k}' for k in expected if k not in state_dict] +
           [f'unexpected {k}' for k in state_dict if k not in expected] +
           [f'shape of {k}' for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape])
    if bad:
        saved = getattr(ckpt.get('args'), 'model', ckpt.get('arch', '?'))
        raise UsageError(f'checkpoint {args.resume} (model {saved}) does not match --model {args.model} with '
                         f'{args.num_classes} classes: {len(bad)} differences, e.g. {bad[0]}')
    try:
        task.load_checkpoint_state(state_dict, ckpt.get('task_state'))
        if task.has_ema() and ckpt.get('state_dict_ema') is not None:
            task.load_checkpoint_state(ckpt['state_dict_ema'], ema=True)
        if not args.no_resume_opt:
            optimizer.load_state_dict(ckpt['optimizer'])
            if loss_scaler is not None and loss_scaler.state_dict_key in ckpt:
                loss_scaler.load_state_dict(ckpt[loss_scaler.state_dict_key])
    except (RuntimeError, ValueError, KeyError) as e:
        raise UsageError(f'cannot resume from {args.resume}: {str(e)[:300]}') from None
    _logger.info(f"Resumed from {args.resume} (epoch {ckpt.get('epoch')})")
    return ckpt.get('epoch', -1) + 1, ckpt.get('train_state') or {}


def rng_states(args) -> list:
    """torch / CUDA / numpy / python RNG states of every rank (gathered on all ranks)."""
    np_state = np.random.get_state()
    state = dict(torch=torch.get_rng_state(), python=random.getstate(),
                 numpy=(np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]))
    if torch.device(args.device).type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state()
    states = [state] * args.world_size
    if args.distributed:
        torch.distributed.all_gather_object(states, state)
    return states


def restore_rng_states(states: list, args) -> None:
    """Put back this rank's RNG states, so a resumed run draws exactly what the uninterrupted run would."""
    if not states or len(states) != args.world_size:
        _logger.warning('Checkpoint has no RNG states for this world size: data order and augmentation will differ')
        return
    state = states[args.rank]
    torch.set_rng_state(state['torch'])
    random.setstate(state['python'])
    name, keys, *rest = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if 'cuda' in state and torch.device(args.device).type == 'cuda':
        torch.cuda.set_rng_state(state['cuda'])


def args_record(args) -> dict:
    """Final argument values (flags + world_size) as plain YAML types, for args.yaml and checkpoints."""
    keys = [a.dest for a in build_parser()._actions if a.dest != 'help'] + ['world_size']
    plain = lambda v: [plain(x) for x in v] if isinstance(v, (list, tuple)) else v  # noqa: E731
    return {k: plain(getattr(args, k)) for k in keys if hasattr(args, k)}


# ----------------------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    """Entry point; returns the exit code: 0 done, 2 bad input, 1 training or push failure."""
    logging.basicConfig(level=logging.INFO, format='%(message)s', stream=sys.stdout)
    try:
        args = parse_args(argv)
        check_args(args)
        return train(args)
    except (UsageError, DataConfigError) as e:
        return report_error(e, 2)
    except (TrainingDiverged, HubPushError) as e:
        return report_error(e, 1)


def train(args) -> int:
    """Set everything up (every input check first, output folder last), run the epochs, push to the Hub."""
    start_time = time.time()
    device = init_distributed_device(args)
    if args.rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    if args.distributed:
        _logger.info(f'Distributed: {args.world_size} processes, this is rank {args.rank} on {device}')
    random_seed(args.seed)  # the same initial weights (and EMA copy) on every rank; per-rank seeds once set up
    if args.digits_recipe:
        _logger.info(f'Built-in digits dataset: defaults from {DIGITS_RECIPE} (flags override them)')
    if uses_digits(args):  # the digits data config, unless a flag or the config says otherwise
        args.num_classes = args.num_classes or DIGITS_INFO['num_classes']
        if args.img_size is None and args.input_size is None:
            args.img_size = DIGITS_INFO['img_size']
        for key in ('mean', 'std', 'crop_pct', 'interpolation'):
            setattr(args, key, getattr(args, key) or DIGITS_INFO[key])

    # Model, stimulator and data: every input error surfaces here, before anything is written.
    stim_config = create_stim_options(args)
    model = create_model(args, stim_config)
    data_config = resolve_data_config(vars(args), model=model, verbose=args.rank == 0)
    if args.sync_bn and args.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    stimulator = None
    if stim_config is not None:
        try:  # finds the residual blocks and checks (one dry forward) that smaller inputs work
            stimulator = Stimulator(model, stim_config, blocks=args.stim_blocks, full_size=data_config['input_size'][1],
                                    rank=args.rank)
        except ValueError as e:  # NoResidualBlocksError, SmallerInputsError, a space or sizes that don't fit
            raise UsageError(str(e)) from None
    datasets = create_datasets(args, data_config['input_size'][-1])

    mixup_active = args.mixup > 0 or args.cutmix > 0
    task = StimulativeTask(model, create_criterion(args, mixup_active), stimulator, device=device,
                           verbose=args.rank == 0).to(device)
    if args.lr is None:  # timm: lr = lr_base * (global batch / lr_base_size), linear or sqrt
        global_batch = args.batch_size * args.world_size * args.grad_accum_steps
        scale = args.lr_base_scale or ('sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear')
        args.lr = args.lr_base * (global_batch / args.lr_base_size) ** (0.5 if scale == 'sqrt' else 1.0)
        _logger.info(f'Learning rate {args.lr:.4g}: {scale} scaling of --lr-base {args.lr_base} to a batch of '
                     f'{global_batch}')
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(args))
    amp_autocast, loss_scaler = nullcontext, None
    if args.amp:
        amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
        amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype)
        if device.type == 'cuda' and amp_dtype == torch.float16:
            loss_scaler = NativeScaler(device='cuda')
    if args.model_ema:
        task.setup_ema(decay=args.model_ema_decay)
    start_epoch, train_state = (resume(args, task, optimizer, loss_scaler) if args.resume else (0, {}))
    random_seed(args.seed, args.rank)  # augmentation and stochastic depth differ per rank (timm's seeding)
    start_epoch = args.start_epoch if args.start_epoch is not None else start_epoch

    # Compile (the full pass, or block by block: never per skip pattern), then DDP: one all-reduce per step.
    if args.torchcompile:
        task.compile(backend=args.torchcompile, mode=args.torchcompile_mode, scope=args.stim_compile)
    if args.distributed:
        task.prepare_distributed(device_ids=[device.index] if device.type == 'cuda' else None)
    eval_model = task.get_eval_model()
    loader_train, loader_eval = create_loaders(args, data_config, datasets, device, mixup_active)
    updates_per_epoch = (len(loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric=args.eval_metric == 'loss'),
        updates_per_epoch=updates_per_epoch)
    if lr_scheduler is not None and start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)
    _logger.info(f'Scheduled epochs: {num_epochs}' + (f', stopping after {args.stop_epoch}' if args.stop_epoch else ''))

    # Outputs, on rank 0 only: nothing has been written before this point.
    saver, output_dir, contents = None, None, CheckpointContents(task)
    if args.rank == 0:
        exp_name = args.experiment or '-'.join([datetime.now().strftime('%Y%m%d-%H%M%S'),
                                                safe_model_name(args.model), str(data_config['input_size'][-1])])
        output_dir = get_outdir(args.output or './output/train', exp_name)
        with open(os.path.join(output_dir, 'args.yaml'), 'w') as f:
            yaml.safe_dump(args_record(args), f, default_flow_style=False, sort_keys=False)
        saver = AtomicCheckpointSaver(model, optimizer, args=argparse.Namespace(**args_record(args)),
                                      amp_scaler=loss_scaler, checkpoint_dir=output_dir, recovery_dir=output_dir,
                                      decreasing=args.eval_metric == 'loss', max_history=args.checkpoint_hist,
                                      task=contents)
        if args.resume and os.path.samefile(os.path.dirname(os.path.abspath(args.resume)), output_dir) \
                and hasattr(saver, 'load_state_dict_from_checkpoint'):  # timm >= 1.0.30
            saver.load_state_dict_from_checkpoint(args.resume)  # keep ranking the best checkpoints
        _logger.info(f'Output folder: {output_dir}')
    if train_state:
        restore_rng_states(train_state.get('rng'), args)

    best_metric, best_epoch, eval_metrics = None, None, {}
    for epoch in range(start_epoch, num_epochs if args.stop_epoch is None else min(num_epochs, args.stop_epoch)):
        if hasattr(loader_train.sampler, 'set_epoch'):
            loader_train.sampler.set_epoch(epoch)
        task.set_stim_enabled(epoch >= args.stim_start_epoch)
        if mixup_active and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
            loader_train.mixup_enabled = False
        train_metrics = train_one_epoch(epoch, task, loader_train, optimizer, args, device, loss_scaler,
                                        amp_autocast, lr_scheduler, saver)

        eval_models = {'': eval_model, 'ema_': task.get_eval_model(ema=True) if task.has_ema() else None}
        eval_metrics = OrderedDict()
        for prefix, net in eval_models.items():
            if net is None:
                continue
            if args.stim_bn_recal:  # the authors re-estimate BN statistics before every evaluation
                used = recalibrate_bn(net, loader_train, args.stim_bn_recal, device=device)
                _logger.info(f"Re-estimated BatchNorm statistics{' of the EMA model' if prefix else ''} on {used} "
                             f"training images per process")
            if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
                distribute_bn(net, args.world_size, args.dist_bn == 'reduce')
            eval_metrics.update((prefix + k, v) for k, v in validate(net, loader_eval, args, amp_autocast).items())
        _logger.info(f"Eval: {epoch}  Loss: {eval_metrics['loss']:.4f}  Acc@1: {eval_metrics['top1']:.2f}  "
                     f"Acc@5: {eval_metrics['top5']:.2f}" +
                     (f"  EMA Acc@1: {eval_metrics['ema_top1']:.2f}" if task.has_ema() else ''))

        contents.train_state = dict(rng=rng_states(args), loader_epoch=epoch + 1)
        if saver is not None:
            best_metric, best_epoch = saver.save_checkpoint(epoch, metric=eval_metrics[args.eval_metric])
            summary = os.path.join(output_dir, 'summary.csv')
            update_summary(epoch, train_metrics, eval_metrics, filename=summary, lr=optimizer.param_groups[0]['lr'],
                           write_header=not os.path.exists(summary) or os.path.getsize(summary) == 0)
        if lr_scheduler is not None:
            lr_scheduler.step(epoch + 1, eval_metrics[args.eval_metric])

    if best_metric is not None:
        _logger.info(f'*** Best {args.eval_metric}: {best_metric:.4f} (epoch {best_epoch}); '
                     f'{(time.time() - start_time) / 60:.1f} min in all')
    if saver is not None and args.stop_epoch is not None and args.stop_epoch < num_epochs:
        _logger.info(f"Stopped after epoch {args.stop_epoch} of {num_epochs}: continue with the same flags and "
                     f"--resume {os.path.join(output_dir, 'last.pth.tar')} --experiment {os.path.basename(output_dir)}")
    if args.distributed:
        torch.distributed.destroy_process_group()
    if args.rank == 0 and (args.push_to_hub or args.loafing_eval):
        model, source = final_weights(args, task, output_dir, best_metric, best_epoch)
        card_sections = run_loafing_eval(args, model, source, output_dir, data_config, device) \
            if args.loafing_eval else []
        if args.push_to_hub:
            push_to_hub(args, task, model, source, output_dir, data_config, eval_metrics, best_metric, card_sections)
    return 0


def run_loafing_eval(args, model, source, output_dir, data_config, device) -> list:
    """Evaluate the full net and --loafing-eval random subnets of the ST space (the same set for any --stim, so
    runs are comparable); writes <output>/loafing and returns the model-card section (table + plot)."""
    from timm_stim.loafing import create_eval_loader, format_summary, loafing_eval, loafing_markdown
    loader = create_eval_loader(args.dataset, args.data_dir, args.val_split, data_config,
                                batch_size=args.validation_batch_size or args.batch_size, workers=args.workers,
                                device=device)  # not the DistributedSampler's shard: every image
    folder = os.path.join(output_dir, 'loafing')
    _, summary = loafing_eval(model, loader, subnets=f'random:{args.loafing_eval}', space='st', output_dir=folder,
                              label=f'{args.model} --stim {args.stim}', seed=args.seed,
                              input_size=data_config['input_size'], device=device)
    _logger.info(f'Network loafing ({folder}):\n{format_summary(summary)}')
    return [loafing_markdown(summary, 'loafing.png')]


# ------------------------------------------------------------------------------------------------------------ Hub

def final_weights(args, task, output_dir, best_metric, best_epoch):
    """A plain timm model (no DDP/compile wrappers) with the --hub-weights weights, and a description of them."""
    if args.hub_weights == 'best':
        state_dict = read_checkpoint(os.path.join(output_dir, 'model_best.pth.tar'))['state_dict']
        source = 'best checkpoint' + (f' (epoch {best_epoch}, eval {args.eval_metric} {best_metric:.2f})'
                                      if best_metric is not None else '')
    elif args.hub_weights == 'ema':
        state_dict, source = task.get_eval_model(ema=True).module.state_dict(), 'EMA weights after the last epoch'
    else:
        state_dict, source = task.model.state_dict(), 'weights after the last epoch'
    model = timm.create_model(args.model, num_classes=args.num_classes, **args.model_kwargs)  # plain, no wrappers
    model.load_state_dict({k[7:] if k.startswith('module.') else k: v for k, v in state_dict.items()})
    return model.to(args.device).eval(), source


def push_to_hub(args, task, model, source, output_dir, data_config, eval_metrics, best_metric, card_sections) -> None:
    """Export `model` as a plain timm model with a model card into <output>/hf_export, then push it."""
    from timm_stim.hub import create_model_card, export_timm_model, push_folder_to_hub, split_recipe
    record, defaults = args_record(args), vars(build_parser().parse_args([]))
    recipe, stim = split_recipe({k: v for k, v in record.items()  # the card lists what differs from the defaults
                                 if k in CARD_ARGS or k.startswith('stim') or v != defaults.get(k)})
    if task.stimulator is None:
        stim = {'stim': 'none (plain training, no subnetworks)'}
    else:
        sampler, sizes = task.stimulator.sampler, task.stimulator.size_sampler.sizes
        stim['stim_rule'] = (f'K={",".join(map(str, sampler.k_list))}' if sampler.k_list else
                             f'bernoulli p={sampler.drop_prob}') + f' over stages {sampler.layout.stage_sizes}'
        stim['stim_input_sizes'] = f'{sizes[0]}..{sizes[-1]} px'
    dataset = ('scikit-learn digits (built into timm_stim: 1438 train / 359 validation images, 8x8 upsampled to '
               '32 px)') if uses_digits(args) else (args.dataset or 'an image-folder dataset')
    metrics = OrderedDict(exported_weights=source, epochs_trained=args.stop_epoch or args.epochs)
    metrics.update((f'final_eval_{k}', v) for k, v in eval_metrics.items())
    if best_metric is not None:
        metrics[f'best_eval_{args.eval_metric}'] = best_metric
    plot = os.path.join(output_dir, 'loafing', 'loafing.png')
    folder = export_timm_model(
        model.cpu(), os.path.join(output_dir, 'hf_export'), args.model,
        model_args=dict(args.model_kwargs, num_classes=args.num_classes),
        model_card=create_model_card(args.model, args.hub_repo_id, dataset, recipe, stim, metrics,
                                     extra_sections=card_sections),
        extra_files=[plot] if card_sections and os.path.isfile(plot) else None,
        data_config={k: v for k, v in data_config.items()
                     if k in ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')})
    _logger.info(f'Exported the {source} to {folder}; pushing to {args.hub_repo_id}')
    url = push_folder_to_hub(folder, args.hub_repo_id, private=args.hub_private, revision=args.hub_revision)
    _logger.info(f'Pushed to {url}')


if __name__ == '__main__':
    sys.exit(main())
