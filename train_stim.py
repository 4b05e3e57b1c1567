#!/usr/bin/env python3
"""Train a timm model with Stimulative Training (ST, ST++) or plainly (--stim none).

    python train_stim.py --model resnet18          # ST++ on the built-in scikit-learn digits, CPU-friendly
    python train_stim.py -c hparams/resnet50_stpp_in1k.yaml --data-dir /data/imagenet
    torchrun --nproc_per_node=2 train_stim.py -c hparams/resnet50_stpp_in1k.yaml --data-dir /data/imagenet

timm's training recipe rebuilt from timm's library (timm.data, .optim, .scheduler, .loss, .utils) around
`timm_stim.StimulativeTask`. Each step runs the full network and M sampled subnetworks inside ONE forward of the
task and back-propagates `main loss + stim weight * sum(stim losses)` in ONE backward, so DDP does one all-reduce
per step. `--stim none` goes through the same loop without a stimulator and is timm's training: same flags and
seed, same summary.csv (tests/test_timm_parity.py; differences in docs/timm_compat.md). Every timm train.py flag
is accepted (timm_stim/train_args.py); -c/--config takes a recipe or any args.yaml, timm's included.

Read top to bottom: arguments -> set-up -> train_one_epoch / validate -> checkpoints -> main -> Hub export.
Exit codes: 0 done, 2 bad input (found before anything is written), 1 failure while training or pushing.
"""
import argparse
import csv
import difflib
import importlib
import json
import math
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
from timm.data import AugMixDataset, FastCollateMixup, Mixup, create_loader, resolve_data_config
from timm.layers import convert_splitbn_model, set_fast_norm
from timm.loss import BinaryCrossEntropy, JsdCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import (AverageMeter, CheckpointSaver, NativeScaler, accuracy, dispatch_clip_grad, distribute_bn,
                        get_outdir, init_distributed_device, random_seed, set_jit_fuser, update_summary)

from timm_stim import StimulativeTask, Stimulator, create_stim_config, parse_space, recalibrate_bn, smaller_input_kwargs
from timm_stim.checkpoint import (DATA_CONFIG_KEYS, clean_state_dict, first_non_finite, read_checkpoint_metadata,
                                  read_training_checkpoint, sanitize_saver_state)
from timm_stim.cli import UsageError, one_line, report_error
from timm_stim.data import DIGITS_INFO, DataConfigError, FixedSubset, create_dataset_or_digits, is_digits
from timm_stim.train_args import args_record, build_parser, check_args as check_flag_values
from timm_stim.train_args import parse_args as parse_flags
from timm_stim.hub import HubPushError

_logger = logging.getLogger('train_stim')

DIGITS_RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'hparams', 'digits_resnet18.yaml')
CARD_ARGS = ('model', 'dataset', 'epochs', 'batch_size', 'opt', 'lr', 'sched', 'weight_decay')  # always on the card

# UsageError (timm_stim.cli; ArgsError is one): bad input found before any work, `error: <message>`, exit code 2


class TrainingDiverged(Exception):
    """A non-finite loss, metric or weight: printed as `error: <message>`, exit code 1; no checkpoint is written."""


# ---------------------------------------------------------------------------------------------------- arguments
# The flags are timm's train.py flags (same names, dests, defaults, groups and order) plus --stim* / --hub*:
# timm_stim/train_args.py. Checking every value happens there too, in one table-driven function.

def uses_digits(args) -> bool:
    """The built-in default data: no data dir and no dataset (or 'digits')."""
    return is_digits(args.dataset, args.data_dir)


def parse_args(argv=None) -> argparse.Namespace:
    """timm's two-stage parse: -c/--config sets defaults, the command line overrides them.

    On the built-in digits without -c, hparams/digits_resnet18.yaml serves as the config.
    """
    args = parse_flags(argv, default_config=lambda a: DIGITS_RECIPE if uses_digits(a) and os.path.isfile(
        DIGITS_RECIPE) else None)
    args.digits_recipe = bool(args.default_config)
    return args


def check_args(args) -> None:
    """Every flag's type and range (train_args.check_args), then what only this script knows about."""
    check_flag_values(args)
    if args.config and not args.data_dir and not args.dataset:
        raise UsageError(f'{args.config} trains on an image folder: pass --data-dir (or --dataset digits to try it '
                         f'on the built-in digits)')
    if args.stim != 'none':
        try:
            parse_space(args.stim_space or args.stim)
        except ValueError as e:
            raise UsageError(f'--stim-space: {e}') from None
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
    factory = {}  # --pretrained-path: a local weights file instead of the model's default source, head adapted
    if args.pretrained_path:
        factory['pretrained_cfg_overlay'] = dict(file=args.pretrained_path, num_classes=-1)
    in_chans = args.in_chans or (args.input_size[0] if args.input_size else 3)
    try:  # timm.create_model drops the None ones, so a model that does not take e.g. bn_eps still builds
        model = timm.create_model(
            name, pretrained=args.pretrained, in_chans=in_chans, num_classes=args.num_classes, drop_rate=args.drop,
            drop_path_rate=args.drop_path, drop_block_rate=args.drop_block, global_pool=args.gp,
            bn_momentum=args.bn_momentum, bn_eps=args.bn_eps, scriptable=args.torchscript,
            checkpoint_path=args.initial_checkpoint, **factory, **kwargs)
    except TypeError as e:
        raise UsageError(f'cannot create {name} with {kwargs}: {e}') from None
    with torch.no_grad():
        if args.head_init_scale is not None:
            model.get_classifier().weight.mul_(args.head_init_scale)
            model.get_classifier().bias.mul_(args.head_init_scale)
        if args.head_init_bias is not None:
            model.get_classifier().bias.fill_(args.head_init_bias)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    args.num_classes = model.num_classes
    return model


def create_datasets(args, data_config) -> list:
    """Train and validation (None when --val-split is '') datasets; a bad data dir / dataset raises
    DataConfigError before any work."""
    img_mode = args.input_img_mode or ('RGB' if data_config['input_size'][0] == 3 else 'L')
    kwargs = dict(img_size=data_config['input_size'][-1], class_map=args.class_map, download=args.dataset_download,
                  batch_size=args.batch_size, input_img_mode=img_mode, input_key=args.input_key,
                  target_key=args.target_key, trust_remote_code=args.dataset_trust_remote_code)
    train = create_dataset_or_digits(args.dataset, args.data_dir, args.train_split, is_training=True, seed=args.seed,
                                     repeats=args.epoch_repeats, num_samples=args.train_num_samples, **kwargs)
    val = create_dataset_or_digits(args.dataset, args.data_dir, args.val_split, is_training=False,
                                   num_samples=args.val_num_samples, **kwargs) if args.val_split else None
    num = args.train_num_samples  # timm ignores it for map-style datasets; here it takes a fixed random subset
    if num and not isinstance(train, torch.utils.data.IterableDataset) and num < len(train):
        train = FixedSubset(train, num, seed=0)
    for name, dataset in (('training', train), ('validation', val)):
        check_first_image(dataset, name, args)
    if args.aug_splits > 1:  # AugMix: several augmented views of each image (plain training only)
        train = AugMixDataset(train, num_splits=args.aug_splits)
    return train, val


def check_first_image(dataset, name: str, args) -> None:
    """Decode the first image of an image folder (no transform is set yet, so no random number is drawn): a folder
    of files with image names that do not decode is bad input, found before anything is written."""
    if dataset is None or not args.data_dir or args.dataset or isinstance(dataset, torch.utils.data.IterableDataset) \
            or len(dataset) == 0:
        return
    try:
        dataset[0]
    except Exception as e:
        raise UsageError(f'cannot read the first {name} image in {args.data_dir} ({type(e).__name__}: '
                         f'{one_line(e)[:200]}); check that --data-dir holds decodable images') from None


def create_loaders(args, data_config, datasets, device, mixup_active: bool, model_dtype=None):
    """timm's create_loader for train (augmentation, mixup) and eval (None without a validation split).

    Returns (train loader, eval loader, mixup_fn): with the prefetcher (default) mixup runs in the collate and
    normalisation on the device; with --no-prefetcher mixup_fn mixes each batch in the training loop.
    """
    mixup_args = dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                      prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                      label_smoothing=args.smoothing, num_classes=args.num_classes)
    if args.aug_repeats and (not args.distributed or isinstance(datasets[0], torch.utils.data.IterableDataset)):
        raise UsageError('--aug-repeats needs distributed training (torchrun) on a map-style dataset, as in timm')
    prefetcher = not args.no_prefetcher
    collate_fn = FastCollateMixup(**mixup_args) if mixup_active and prefetcher else None
    mixup_fn = Mixup(**mixup_args) if mixup_active and not prefetcher else None
    common = dict(input_size=data_config['input_size'], mean=data_config['mean'], std=data_config['std'],
                  distributed=args.distributed, pin_memory=args.pin_mem, device=device, use_prefetcher=prefetcher,
                  img_dtype=model_dtype or torch.float32)
    loader_train = create_loader(
        datasets[0], batch_size=args.batch_size, is_training=True, no_aug=args.no_aug, re_prob=args.reprob,
        re_mode=args.remode, re_count=args.recount, re_split=args.resplit, train_crop_mode=args.train_crop_mode,
        scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
        color_jitter_prob=args.color_jitter_prob, grayscale_prob=args.grayscale_prob,
        gaussian_blur_prob=args.gaussian_blur_prob, auto_augment=args.aa, num_aug_repeats=args.aug_repeats,
        num_aug_splits=args.aug_splits if args.aug_splits > 1 else 0,
        interpolation=args.train_interpolation if args.train_interpolation and not args.no_aug
        else data_config['interpolation'], num_workers=args.workers, worker_seeding=args.worker_seeding,
        collate_fn=collate_fn, use_multi_epochs_loader=args.use_multi_epochs_loader, **common)
    loader_eval = None
    if datasets[1] is not None:
        few_workers = args.distributed and ('tfds' in args.dataset or 'wds' in args.dataset)  # less DDP padding
        loader_eval = create_loader(
            datasets[1], batch_size=args.validation_batch_size or args.batch_size, is_training=False,
            interpolation=data_config['interpolation'], crop_pct=data_config['crop_pct'],
            num_workers=min(2, args.workers) if few_workers else args.workers, **common)
    if len(loader_train) == 0:
        raise UsageError(f'{len(datasets[0])} training images make no full batch of {args.batch_size} per process')
    return loader_train, loader_eval, mixup_fn


def create_criterion(args, mixup_active: bool) -> nn.Module:
    """timm's training loss: soft-target CE under mixup, label smoothing, or BCE."""
    bce = dict(target_threshold=args.bce_target_thresh, sum_classes=args.bce_sum, pos_weight=args.bce_pos_weight)
    if args.jsd_loss:
        return JsdCrossEntropy(num_splits=args.aug_splits, smoothing=args.smoothing)
    if mixup_active:  # mixup makes soft targets, label smoothing included
        return BinaryCrossEntropy(**bce) if args.bce_loss else SoftTargetCrossEntropy()
    if args.smoothing:
        return (BinaryCrossEntropy(smoothing=args.smoothing, **bce) if args.bce_loss
                else LabelSmoothingCrossEntropy(smoothing=args.smoothing))
    return nn.CrossEntropyLoss()  # timm: plain CE here, even with --bce-loss


# ------------------------------------------------------------------------------------------- training, validation

def train_one_epoch(epoch, task, loader, optimizer, args, device, loss_scaler=None, amp_autocast=nullcontext,
                    lr_scheduler=None, saver=None, mixup_fn=None, model_dtype=None, output_dir=None) -> OrderedDict:
    """One epoch: a forward (full net + subnets) and a backward per batch, an update every grad_accum_steps."""
    if args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        if mixup_fn is not None:
            mixup_fn.mixup_enabled = False
        elif hasattr(loader, 'mixup_enabled'):
            loader.mixup_enabled = False
    task.train()
    second_order = getattr(optimizer, 'is_second_order', False)
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
    grad_steps = None  # accumulation steps the task's in-forward subnet backward divides by
    optimizer.zero_grad()
    for batch_idx, (input, target) in enumerate(bar or loader):
        data_time.update(time.time() - end)
        need_update = batch_idx == num_batches - 1 or (batch_idx + 1) % accum == 0
        steps = last_accum if batch_idx >= num_batches - last_accum else accum
        if args.no_prefetcher:  # the prefetcher has already moved (and mixed) the batch
            input, target = input.to(device=device, dtype=model_dtype), target.to(device=device)
            if mixup_fn is not None:
                input, target = mixup_fn(input, target)
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        if stimulator is not None and steps != grad_steps:  # memory-lean subnets back-propagate inside forward
            task.set_grad_multiplier(1.0 / steps)  # a Python number: no host-device sync (the AMP scale is given once)
            grad_steps = steps

        with task.no_sync() if not need_update else nullcontext():  # DDP: all-reduce on the last micro-step only
            with amp_autocast():
                out = task(input, target)
            loss = out['loss'] / steps
            params = task.get_clip_parameters(exclude_head='agc' in args.clip_mode)
            if loss_scaler is not None:
                loss_scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                            parameters=params, create_graph=second_order, need_update=need_update)
            else:
                loss.backward(create_graph=second_order)
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
        if not need_update:
            end = time.time()
            continue
        num_updates += 1
        update_idx = num_updates - epoch * updates_per_epoch - 1
        optimizer.zero_grad(set_to_none=True)
        task.update_ema(step=num_updates)
        if args.synchronize_step and device.type == 'cuda':
            torch.cuda.synchronize()
        if update_idx % args.log_interval == 0 or batch_idx == num_batches - 1:
            loss_avg, main_avg, stim_avg = _mean_over_ranks(sums, count, epoch, update_idx, args)
            step_time.update((time.time() - last_log) / (num_updates - last_log_updates))
            last_log, last_log_updates = time.time(), num_updates
            stim_text = (f'Main: {main_avg:.4f}  Stim: {stim_avg:.4f}  Depth: {depth / count:.3f}  '
                         f'Size: {size / count:.1f}  ' if stimulator is not None else '')
            lrs = [group['lr'] for group in optimizer.param_groups]
            text = (f'Train: {epoch} [{update_idx:>4d}/{updates_per_epoch} '
                    f'({100. * (update_idx + 1) / updates_per_epoch:>3.0f}%)]  Loss: {loss_avg:#.4g}  {stim_text}'
                    f'Step: {step_time.val:.3f}s  {n * accum * args.world_size / step_time.val:>7.1f} img/s  '
                    f'LR: {sum(lrs) / len(lrs):.3e}  Data: {data_time.avg:.3f}s')
            if args.rank == 0:
                (bar.write if bar else _logger.info)(text)
                if args.save_images and output_dir:
                    import torchvision.utils
                    torchvision.utils.save_image(input, os.path.join(output_dir, f'train-batch-{batch_idx}.jpg'),
                                                 padding=0, normalize=True)
        if saver is not None and args.recovery_interval and (update_idx + 1) % args.recovery_interval == 0 \
                and torch.isfinite(sums).all():  # every N updates; as in timm, it resumes at the next epoch
            saver.save_recovery(epoch, batch_idx=update_idx)
        if lr_scheduler is not None:  # only a plateau schedule uses the running loss
            lr_scheduler.step_update(num_updates=num_updates,
                                     metric=sums[0].item() / count if args.sched == 'plateau' else None)
        end = time.time()
    if hasattr(optimizer, 'sync_lookahead'):
        optimizer.sync_lookahead()

    loss_avg, main_avg, stim_avg = _mean_over_ranks(sums, count, epoch, updates_per_epoch - 1, args)
    if task.stimulator is None:  # plain training: timm's summary.csv columns
        return OrderedDict(loss=loss_avg)
    # nan before --stim-start-epoch, so summary.csv keeps its columns
    return OrderedDict(loss=loss_avg, main_loss=main_avg, stim_loss=stim_avg,
                       depth_frac=depth / count if stimulator else float('nan'),
                       stim_size=size / count if stimulator else float('nan'))


def set_loader_epoch(loader, epoch: int) -> None:
    """Tell the dataset (iterable: wds/tfds/hfids), batch sampler or sampler which epoch starts (reshuffle)."""
    if hasattr(loader.dataset, 'set_epoch'):
        loader.dataset.set_epoch(epoch)
    if hasattr(loader.batch_sampler, 'set_epoch'):
        loader.batch_sampler.set_epoch(epoch)
    elif hasattr(loader.sampler, 'set_epoch'):
        loader.sampler.set_epoch(epoch)


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
def validate(model, loader, args, amp_autocast=nullcontext, model_dtype=None) -> OrderedDict:
    """Loss and top-1/top-5 (%) of the full network on the validation set, summed exactly over ranks."""
    model.eval()
    limit = getattr(loader.sampler, 'num_valid_samples', None) if args.distributed else None  # drop DDP padding
    sums, seen = torch.zeros(4, dtype=torch.float64, device=args.device), 0  # loss, top-1, top-5 hits, samples
    for input, target in loader:
        if args.no_prefetcher:
            input, target = input.to(device=args.device, dtype=model_dtype), target.to(device=args.device)
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        with amp_autocast():
            output = model(input)
        output = (output[0] if isinstance(output, (tuple, list)) else output).float()
        if args.tta > 1:  # test-time augmentation: average each run of --tta consecutive outputs
            output = output.unfold(0, args.tta, args.tta).mean(dim=2)
            target = target[0:target.size(0):args.tta]
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
    """timm's CheckpointSaver with every file it publishes appearing atomically, never a non-finite model, and a
    restored history that cannot name a file outside the run folder.

    timm writes tmp.pth.tar and os.replace()s it onto last.pth.tar, but first unlinks last.pth.tar (a moment with
    no last checkpoint), never fsyncs, and makes model_best / checkpoint-N by unlink + hardlink. Here the new file
    is fsynced and each target is swapped in by one os.replace: a crash leaves the old or the new complete file.
    Before anything is written the weights (and EMA) are checked finite; a diverged model raises TrainingDiverged
    and leaves every file as it was.
    """

    def _save(self, save_path, epoch, metric=None):
        if metric is not None and not math.isfinite(metric):
            raise TrainingDiverged(f'non-finite checkpoint metric ({metric}) in epoch {epoch}; {_KEPT}')
        if self.task is not None:
            self.task.check_finite(epoch)
        super()._save(save_path, epoch, metric)

    def load_state_dict(self, state_dict):
        """Restore the history of a checkpoint from this folder, keeping only what its files confirm."""
        state, dropped = sanitize_saver_state(state_dict, self.checkpoint_dir, self.save_prefix, self.extension,
                                              self.decreasing)
        for item in dropped:
            _logger.warning(f'Resume: ignored the checkpoint\'s {item}')
        self.checkpoint_files, self.best_metric, self.best_epoch = (
            state['checkpoint_files'], state['best_metric'], state['best_epoch'])
        _logger.info(f'Restored checkpoint history ({len(self.checkpoint_files)} files), best metric '
                     f'{self.best_metric} (epoch {self.best_epoch})')

    def load_state_dict_from_checkpoint(self, checkpoint_path):
        """Restore the history; then finish what a crash between last.pth.tar and checkpoint-N / model_best left
        undone for the checkpoint resumed from (its own stored epoch and finite metric decide)."""
        restored = super().load_state_dict_from_checkpoint(checkpoint_path)
        meta = read_checkpoint_metadata(checkpoint_path) or {}
        epoch, metric = meta.get('epoch'), meta.get('metric')
        if os.path.basename(checkpoint_path) != 'last' + self.extension or not isinstance(epoch, int) or epoch < 0 \
                or not isinstance(metric, float) or not math.isfinite(metric):
            return restored
        save_path = self._checkpoint_path(epoch)
        worst = self.checkpoint_files[-1] if self.checkpoint_files else None
        if not os.path.exists(save_path) and (len(self.checkpoint_files) < self.max_history or worst[1] is None
                                              or self.cmp(metric, worst[1])):
            if len(self.checkpoint_files) >= self.max_history:
                self._cleanup_checkpoints(1)
            self._duplicate(checkpoint_path, save_path)
            self._track_checkpoint(save_path, epoch, metric)  # also model_best, when it is the best
        elif self.best_metric is None or self.cmp(metric, self.best_metric):
            self.best_metric, self.best_epoch = metric, epoch
            self._duplicate(checkpoint_path, os.path.join(self.checkpoint_dir, 'model_best' + self.extension))
        return restored

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

    def check_finite(self, epoch: int) -> None:
        """Raise TrainingDiverged when a weight or buffer of the model or its EMA is NaN or infinite."""
        nets = [('model', self.task.model)] + ([('EMA', self.task.get_eval_model(ema=True))]
                                                if self.task.has_ema() else [])
        for what, net in nets:
            bad = first_non_finite(net.state_dict())
            if bad is not None:
                raise TrainingDiverged(f'non-finite {what} weights ({bad}) after epoch {epoch}; {_KEPT}')

    def get_checkpoint_state(self, ema=False, **kwargs):
        state = self.task.get_checkpoint_state(ema=ema, **kwargs)
        if not ema:
            state['train_state'] = self.train_state
        return state


_KEPT = ('training stopped and nothing was saved: the last good checkpoint is kept (last.pth.tar in the output folder, '
         'once an epoch has finished); lower --lr or use --clip-grad')


def check_finite_metrics(epoch: int, metrics: dict, what: str) -> None:
    """Stop (exit 1) on a NaN / infinite loss or accuracy: the epoch is neither summarised nor checkpointed."""
    bad = {k: v for k, v in metrics.items() if k in ('loss', 'top1', 'top5') and not math.isfinite(v)}
    if bad:
        raise TrainingDiverged(f'non-finite {what} {", ".join(f"{k} ({v})" for k, v in bad.items())} in epoch '
                               f'{epoch}; {_KEPT}')


def write_summary_row(filename: str, epoch: int, train_metrics: dict, eval_metrics: dict, lr: float,
                      log_wandb: bool = False) -> None:
    """Append the epoch's summary.csv row (timm's format), durably, before the epoch's checkpoint is published.

    Rows of this epoch or later (left by a run killed after its row and before its checkpoint, then resumed) are
    dropped first, atomically, so a resumed run neither loses nor repeats a row.
    """
    if os.path.exists(filename):
        with open(filename, newline='') as f:
            reader = csv.reader(f)
            header, rows = next(reader, None), list(reader)
        keep = [r for r in rows if r and r[0].lstrip('-').isdigit() and int(r[0]) < epoch]
        if header and len(keep) != len(rows):
            tmp = filename + '.tmp'
            with open(tmp, 'w', newline='') as f:
                csv.writer(f).writerows([header] + keep)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, filename)
    update_summary(epoch, train_metrics, eval_metrics, filename=filename, lr=lr,
                   write_header=not os.path.exists(filename) or os.path.getsize(filename) == 0, log_wandb=log_wandb)
    with open(filename, 'rb+') as f:
        os.fsync(f.fileno())


def read_checkpoint(path: str) -> dict:
    """A training checkpoint read safely by timm_stim.checkpoint; an unusable file is bad input (exit 2)."""
    try:
        return read_training_checkpoint(path)
    except (ValueError, OSError) as e:
        raise UsageError(one_line(e)) from None


def resume(args, task, optimizer, loss_scaler) -> tuple:
    """Restore weights, subnet samplers, EMA, optimizer and scaler from --resume, writing nothing.

    Returns (epoch to start at, the checkpoint's train_state with every rank's RNG states).
    """
    ckpt = read_checkpoint(args.resume)
    state_dict = clean_state_dict(ckpt['state_dict'])
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
    except (RuntimeError, OSError, ValueError) as e:  # e.g. out of memory, a full disk, an unreadable image
        return report_error(RuntimeError(f'{type(e).__name__} while training: {one_line(e)[:400]}; the last '
                                         f'checkpoint in the output folder is intact (resume with --resume)'), 1)


def train(args) -> int:
    """Set everything up (every input check first, output folder last), run the epochs, push to the Hub.

    The order is timm's train.py, so that `--stim none` draws the same random numbers and trains the same run.
    """
    start_time = time.time()
    for module in args.device_modules or []:  # e.g. a backend that registers a device type
        importlib.import_module(module)
    device = init_distributed_device(args)
    if args.rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    _logger.info(f'Distributed: {args.world_size} processes, this is rank {args.rank} on {device}' if args.distributed
                 else f'Training with a single process on {device}')
    model_dtype = getattr(torch, args.model_dtype) if args.model_dtype else None
    # Seed once, before the model is built, per rank, as timm does: DDP copies rank 0's weights to every rank,
    # the data order, augmentation and stochastic depth differ per rank. No re-seeding later.
    random_seed(args.seed, args.rank)
    if args.fuser:
        set_jit_fuser(args.fuser)
    if args.fast_norm:
        set_fast_norm()
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
    _logger.info(f'Model {safe_model_name(args.model)} created, param count: '
                 f'{sum(p.numel() for p in model.parameters())}')
    data_config = resolve_data_config(vars(args), model=model, verbose=args.rank == 0)
    if args.split_bn:  # BatchNorm per augmentation split (plain training only, checked in train_args)
        model = convert_splitbn_model(model, max(args.aug_splits, 2))
    model.to(device=device, dtype=model_dtype)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.sync_bn and args.distributed:
        args.dist_bn = ''  # synchronized statistics need no averaging after the epoch
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.torchscript:
        model = torch.jit.script(model)
    stimulator = None
    if stim_config is not None:
        try:  # finds the residual blocks and checks (one dry forward) that smaller inputs work
            stimulator = Stimulator(model, stim_config, blocks=args.stim_blocks, full_size=data_config['input_size'][1],
                                    rank=args.rank)
        except ValueError as e:  # NoResidualBlocksError, SmallerInputsError, a space or sizes that don't fit
            raise UsageError(str(e)) from None
    amp_autocast, loss_scaler = nullcontext, None
    if args.amp:
        amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
        amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype)
        if device.type == 'cuda' and amp_dtype == torch.float16:
            loss_scaler = NativeScaler(device='cuda')
        _logger.info(f'Mixed precision: autocast to {args.amp_dtype}' + (' with loss scaling' if loss_scaler else ''))
    else:
        _logger.info(f'AMP off: training in {model_dtype or torch.float32}')
    datasets = create_datasets(args, data_config)
    mixup_active = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    loader_train, loader_eval, mixup_fn = create_loaders(args, data_config, datasets, device, mixup_active, model_dtype)

    # timm: without --lr, lr = lr_base * (global batch / lr_base_size), linear or sqrt. args.yaml keeps the
    # unresolved value (args.lr_given), so the recipe rescales when re-used at another batch size.
    args.lr_given = args.lr
    if not args.lr:
        global_batch = args.batch_size * args.world_size * args.grad_accum_steps
        scale = args.lr_base_scale or ('sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear')
        args.lr = args.lr_base * (global_batch / args.lr_base_size) ** (0.5 if scale == 'sqrt' else 1.0)
        _logger.info(f'Learning rate {args.lr:.4g}: {scale} scaling of --lr-base {args.lr_base} to a batch of '
                     f'{global_batch}')
    task = StimulativeTask(model, create_criterion(args, mixup_active).to(device), stimulator, device=device,
                           dtype=model_dtype, verbose=args.rank == 0).to(device)
    task.set_loss_scaler(loss_scaler)  # once: subnet passes that back-propagate inside forward scale like the loop
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    _logger.info(f'Created {type(optimizer).__name__} ({args.opt}) optimizer: ' + ', '.join(
        f'{k}: {v}' for k, v in dict(optimizer.defaults, weight_decay=args.weight_decay).items()))
    if args.model_ema:  # before --resume, which restores it; the EMA is what eval_* reports, as in timm
        task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                       device='cpu' if args.model_ema_force_cpu else None)
    start_epoch, train_state = (resume(args, task, optimizer, loss_scaler) if args.resume else (0, {}))
    start_epoch = args.start_epoch if args.start_epoch is not None else start_epoch

    # Compile (the full pass, or block by block: never per skip pattern), then DDP: one all-reduce per step.
    if args.torchcompile:
        task.compile(backend=args.torchcompile, mode=args.torchcompile_mode, scope=args.stim_compile)
    if args.distributed:
        task.prepare_distributed(device_ids=[device.index] if device.type == 'cuda' else None,
                                 broadcast_buffers=not args.no_ddp_bb)
        if task.has_ema() and not args.model_ema_force_cpu:  # each rank built its own weights: the EMA starts
            # from rank 0's on every rank, as DDP's model does
            for tensor in task.get_trainable_module(ema=True).state_dict().values():
                torch.distributed.broadcast(tensor, 0)
    eval_model = task.get_eval_model()
    eval_metric = args.eval_metric if loader_eval is not None else 'loss'  # no validation: rank by train loss
    updates_per_epoch = (len(loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric=eval_metric == 'loss'),
        updates_per_epoch=updates_per_epoch)
    if lr_scheduler is not None and start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)
    _logger.info(f'Scheduled epochs: {num_epochs}' + (f', stopping after {args.stop_epoch}' if args.stop_epoch else '')
                 + f"; lr stepped per {'update' if args.sched_on_updates else 'epoch'}")

    # Outputs, on rank 0 only: nothing has been written before this point.
    saver, output_dir, contents = None, None, CheckpointContents(task)
    if args.rank == 0:
        exp_name = args.experiment or '-'.join([datetime.now().strftime('%Y%m%d-%H%M%S'),
                                                safe_model_name(args.model), str(data_config['input_size'][-1])])
        try:
            output_dir = get_outdir(args.output or './output/train', exp_name)
        except OSError as e:  # e.g. a read-only or virtual file system: nothing written yet
            raise UsageError(f'cannot create the run folder in --output {args.output or "./output/train"}: '
                             f'{e.strerror or e}; choose a writable --output') from None
        with open(os.path.join(output_dir, 'args.yaml'), 'w') as f:
            yaml.safe_dump(args_record(args), f, default_flow_style=False, sort_keys=False)
        saver = AtomicCheckpointSaver(model, optimizer, args=argparse.Namespace(**args_record(args)),
                                      amp_scaler=loss_scaler, checkpoint_dir=output_dir, recovery_dir=output_dir,
                                      decreasing=eval_metric == 'loss', max_history=args.checkpoint_hist,
                                      task=contents)
        if args.resume and os.path.samefile(os.path.dirname(os.path.abspath(args.resume)), output_dir) \
                and hasattr(saver, 'load_state_dict_from_checkpoint'):  # timm >= 1.0.30
            saver.load_state_dict_from_checkpoint(args.resume)  # keep ranking the best checkpoints
        _logger.info(f'Output folder: {output_dir}')
        if args.log_wandb:
            import wandb
            wandb.init(project=args.wandb_project, name=exp_name, config=args_record(args), tags=args.wandb_tags,
                       resume='must' if args.wandb_resume_id else None, id=args.wandb_resume_id or None)
    if train_state:
        restore_rng_states(train_state.get('rng'), args)

    best_metric, best_epoch, eval_metrics, results = None, None, {}, []
    for epoch in range(start_epoch, num_epochs if args.stop_epoch is None else min(num_epochs, args.stop_epoch)):
        set_loader_epoch(loader_train, epoch)  # samplers and iterable datasets reshuffle per epoch
        task.set_stim_enabled(epoch >= args.stim_start_epoch)
        train_metrics = train_one_epoch(epoch, task, loader_train, optimizer, args, device, loss_scaler,
                                        amp_autocast, lr_scheduler, saver, mixup_fn, model_dtype, output_dir)
        if (epoch + 1) % args.val_interval and epoch + 1 != num_epochs:  # timm: no eval, no checkpoint
            _logger.info(f'Epoch {epoch}: no evaluation or checkpoint (--val-interval {args.val_interval})')
            if lr_scheduler is not None:
                lr_scheduler.step(epoch + 1, metric=None)
            continue

        # Evaluate the model and, with --model-ema, the EMA: then eval_* and the best checkpoint are the EMA's.
        eval_metrics = None
        if loader_eval is not None:
            ema = task.get_eval_model(ema=True) if task.has_ema() and not args.model_ema_force_cpu else None
            for name, net in (('model', eval_model), ('EMA', ema)):
                if net is None:
                    continue
                if args.stim_bn_recal:  # the authors re-estimate BN statistics before every evaluation
                    used = recalibrate_bn(net, loader_train, args.stim_bn_recal, device=device)
                    _logger.info(f'Re-estimated BatchNorm statistics of the {name} on {used} training images '
                                 f'per process')
                if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
                    distribute_bn(net, args.world_size, args.dist_bn == 'reduce')
                eval_metrics = validate(net, loader_eval, args, amp_autocast, model_dtype)
                check_finite_metrics(epoch, eval_metrics, f'{name} validation')
                _logger.info(f"Eval{' (EMA)' if name == 'EMA' else ''}: {epoch}  Loss: {eval_metrics['loss']:.4f}  "
                             f"Acc@1: {eval_metrics['top1']:.2f}  Acc@5: {eval_metrics['top5']:.2f}")
        elif args.distributed and args.dist_bn in ('broadcast', 'reduce'):
            distribute_bn(eval_model, args.world_size, args.dist_bn == 'reduce')
        latest_metric = (eval_metrics or train_metrics)[eval_metric]

        contents.train_state = dict(rng=rng_states(args), loader_epoch=epoch + 1)
        if saver is not None:  # weights checked first; the summary row is durable before the checkpoint appears
            contents.check_finite(epoch)
            lrs = [group['lr'] for group in optimizer.param_groups]
            write_summary_row(os.path.join(output_dir, 'summary.csv'), epoch, train_metrics, eval_metrics or {},
                              lr=sum(lrs) / len(lrs), log_wandb=args.log_wandb)
            best_metric, best_epoch = saver.save_checkpoint(epoch, metric=latest_metric)
        if lr_scheduler is not None:
            lr_scheduler.step(epoch + 1, latest_metric)
        results.append(dict(epoch=epoch, train=train_metrics, **({'validation': eval_metrics} if eval_metrics else {})))

    if best_metric is not None:
        _logger.info(f'*** Best {eval_metric}: {best_metric:.4f} (epoch {best_epoch}); '
                     f'{(time.time() - start_time) / 60:.1f} min in all')
    if saver is not None and args.stop_epoch is not None and args.stop_epoch < num_epochs:
        _logger.info(f"Stopped after epoch {args.stop_epoch} of {num_epochs}: continue with the same flags and "
                     f"--resume {os.path.join(output_dir, 'last.pth.tar')} --experiment {os.path.basename(output_dir)}")
    if args.rank == 0:  # timm's parsable summary: the (up to) 10 best epochs, best last
        ranked = sorted(results, key=lambda r: r.get('validation', r['train']).get(eval_metric, 0),
                        reverse=eval_metric == 'loss')
        print(f'--result\n{json.dumps(ranked[-10:], indent=4)}')
    if args.distributed:
        torch.distributed.destroy_process_group()
    if args.rank == 0 and (args.push_to_hub or args.loafing_eval or args.export_subnets):
        model, source = final_weights(args, task, output_dir, best_metric, best_epoch)
        card_sections = run_loafing_eval(args, model, source, output_dir, data_config, device) \
            if args.loafing_eval else []
        if args.export_subnets:
            run_subnet_export(args, model, output_dir, data_config, device)
        if args.push_to_hub:
            push_to_hub(args, task, model, source, output_dir, data_config, eval_metrics, best_metric, card_sections)
    return 0


def run_subnet_export(args, model, output_dir, data_config, device) -> None:
    """--export-subnets SPEC: the trained model's subnets as smaller plain timm models in <output>/subnets."""
    from timm_stim.export import export_after_training
    rows = export_after_training(model, args.export_subnets, os.path.join(output_dir, 'subnets'), args_record(args),
                                 data_config, device, label=os.path.basename(output_dir))
    for row in rows:
        top1 = row.get('top1')
        _logger.info(f"Subnet {row['name']}: {row['params']} params, top-1 "
                     f"{'-' if top1 is None else f'{top1:.2f}'}, {row['latency_b1_ms']:.2f} ms at batch 1 (CPU)"
                     f" -> {row['folder'] or '(measured only)'}")


def run_loafing_eval(args, model, source, output_dir, data_config, device) -> list:
    """Evaluate the full net and --loafing-eval random subnets of the ST space (the same set for any --stim, so
    runs are comparable); writes <output>/loafing and returns the model-card section (table + plot)."""
    from timm_stim.data import create_eval_loader
    from timm_stim.loafing import loafing_eval
    from timm_stim.loafing_report import format_summary, loafing_markdown
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
    model.load_state_dict(clean_state_dict(state_dict))
    return model.to(args.device).eval(), source


def push_to_hub(args, task, model, source, output_dir, data_config, eval_metrics, best_metric, card_sections) -> None:
    """Export `model` as a plain timm model with a model card into <output>/hf_export, then push it."""
    from timm_stim.card import create_model_card, split_recipe
    from timm_stim.model_folder import export_timm_model
    from timm_stim.hub import push_folder_to_hub
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
        data_config={k: v for k, v in data_config.items() if k in DATA_CONFIG_KEYS})
    _logger.info(f'Exported the {source} to {folder}; pushing to {args.hub_repo_id}')
    url = push_folder_to_hub(folder, args.hub_repo_id, private=args.hub_private, revision=args.hub_revision)
    _logger.info(f'Pushed to {url}')


if __name__ == '__main__':
    sys.exit(main())
