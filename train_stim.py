#!/usr/bin/env python3
"""Train a timm model with Stimulative Training (ST, ST++) or plainly (--stim none).

    python train_stim.py --model resnet18          # ST++ on the built-in scikit-learn digits, CPU-friendly
    python train_stim.py -c hparams/resnet50_stpp_in1k.yaml --data-dir /data/imagenet
    torchrun --nproc_per_node=2 train_stim.py -c hparams/resnet50_stpp_in1k.yaml --data-dir /data/imagenet

timm's training recipe rebuilt from timm's library (timm.data, .optim, .scheduler, .loss, .utils) around
`timm_stim.StimulativeTask`. Each step runs the full network and M sampled subnetworks inside ONE forward of
the task and back-propagates `main loss + stim weight * sum(stim losses)` in ONE backward, so DDP does one
all-reduce per step. `--stim none` goes through the same loop without a stimulator and is timm's training:
same flags and seed, same summary.csv (tests/test_timm_parity.py; differences in docs/timm_compat.md). Every
timm train.py flag is accepted (timm_stim/train_args.py); -c/--config takes a recipe or any args.yaml.

Read top to bottom: arguments -> main / train (the whole run) -> train_one_epoch -> evaluate / validate.
The pieces that are not the training loop live in the library: set-up factories in timm_stim/train_setup.py,
checkpoints, summary rows, resume and RNG states in timm_stim/run_state.py, the end-of-run loafing report,
subnet export and Hub push in timm_stim/run_exports.py.
Exit codes: 0 done, 2 bad input (found before anything is written), 1 failure while training or pushing.
"""
import argparse
import json
import logging
import os
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from timm.data import resolve_data_config
from timm.utils import AverageMeter, accuracy, dispatch_clip_grad, distribute_bn, random_seed

from timm_stim import parse_space, recalibrate_bn
from timm_stim.cli import UsageError, one_line, report_error, setup_step
from timm_stim.data import DataConfigError, is_digits
from timm_stim.export import check_export_spec
from timm_stim.finetune import measure_subnets, prepare_finetune
from timm_stim.hub import HubPushError
from timm_stim.run_exports import export_run, plain_copy
from timm_stim.run_state import (AtomicCheckpointSaver, CheckpointContents, TrainingDiverged,
                                 check_finite_metrics, create_run_folder, restore_rng_states, resume,
                                 rng_states, run_folder_path, write_summary_row)
from timm_stim.train_args import build_parser, check_args as check_flag_values, parse_args as parse_flags
from timm_stim.train_setup import (apply_digits_defaults, check_transforms, compile_and_distribute, create_amp,
                                   create_criterion, create_datasets, create_loaders, create_lr_scheduler,
                                   create_model, create_optimizer, create_stim_options, create_task,
                                   create_train_stimulator, init_runtime, prepare_model, resolve_lr)

# What tests and benchmarks/ use from this script (some of it imported here from the library):
__all__ = ['main', 'train', 'parse_args', 'check_args', 'train_one_epoch', 'validate', 'evaluate',
           'build_parser', 'UsageError', 'TrainingDiverged', 'AtomicCheckpointSaver', 'CheckpointContents',
           'write_summary_row']

_logger = logging.getLogger('train_stim')

DIGITS_RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'hparams', 'digits_resnet18.yaml')


# ---------------------------------------------------------------------------------------------- arguments
# The flags are timm's train.py flags (same names, dests, defaults, groups and order) plus --stim* / --hub*:
# timm_stim/train_args.py, which also checks every value, in one table-driven function.

def uses_digits(args) -> bool:
    """The built-in default data: no data dir and no dataset (or 'digits')."""
    return is_digits(args.dataset, args.data_dir)


def parse_args(argv=None) -> argparse.Namespace:
    """timm's two-stage parse: -c/--config sets defaults, the command line overrides them.

    On the built-in digits without -c, hparams/digits_resnet18.yaml serves as the config.
    """
    def default_config(args):
        return DIGITS_RECIPE if uses_digits(args) and os.path.isfile(DIGITS_RECIPE) else None

    args = parse_flags(argv, default_config=default_config)
    args.digits_recipe = bool(args.default_config)
    args.explicit_keys = explicit_keys(argv, args)
    return args


def explicit_keys(argv, args) -> set:
    """The flags the user set: on the command line or in their own -c config (not the built-in digits recipe).
    --finetune fills only the others."""
    strip = argparse.ArgumentParser(add_help=False)
    strip.add_argument('-c', '--config')
    _, remaining = strip.parse_known_args(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    given, _ = parser.parse_known_args(remaining)
    return set(vars(given)) | (set(args.config_keys) if args.config else set())


def check_args(args) -> None:
    """Every flag's type and range (train_args.check_args), then what only this script knows about."""
    check_flag_values(args)
    if args.config and not args.data_dir and not args.dataset:
        raise UsageError(f'{args.config} trains on an image folder: pass --data-dir (or --dataset digits to '
                         f'try it on the built-in digits)')
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


# --------------------------------------------------------------------------------------------------- main

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
    except (RuntimeError, OSError, ValueError, AssertionError) as e:  # out of memory, a full disk, a bad image
        message = (f'{type(e).__name__} while training: {one_line(e)[:400]}; the last checkpoint in the '
                   f'output folder is intact (resume with --resume)')
        return report_error(RuntimeError(message), 1)


def train(args) -> int:
    """Set everything up (every input check first, output folder last), run the epochs, export the result.

    The order is timm's train.py, so that `--stim none` draws the same random numbers and trains the same run.
    """
    start_time = time.time()
    # Set-up is a transaction: everything the flags decide is built and checked here, and any failure is bad input
    # (exit 2, one line naming the flags: setup_step), before the first byte is written.
    with setup_step('set-up failed', 'check the flags and files this run was given'):  # any step not named below
        device, model_dtype = init_runtime(args)
        # Seed once, before the model is built, per rank, as timm does: DDP copies rank 0's weights to every rank,
        # the data order, augmentation and stochastic depth differ per rank. No re-seeding later.
        random_seed(args.seed, args.rank)
        finetune = prepare_finetune(args)  # --finetune: the source's model flags, the fine-tune defaults (logged)
        apply_digits_defaults(args, DIGITS_RECIPE)  # the digits data config, unless a flag or the config sets it
        stim_config = create_stim_options(args)
        model = create_model(args, stim_config, finetune)
        with setup_step('cannot resolve the data config', 'check --input-size, --img-size, --mean, --std'):
            data_config = resolve_data_config(vars(args), model=model, verbose=args.rank == 0)
        with setup_step('cannot prepare the model', 'check --channels-last, --sync-bn, --model-dtype'):
            model = prepare_model(model, args, device, model_dtype)
        with setup_step(f'cannot set up --stim {args.stim}', 'check the --stim-* flags'):
            stimulator = create_train_stimulator(model, stim_config, args, full_size=data_config['input_size'][1])
        if args.export_subnets:  # the spec against this model's real layout: refused now, not after training
            with setup_step(f'--export-subnets {args.export_subnets} does not fit --model {args.model}',
                            'give depths, keep-masks or pareto:N of this model\'s residual blocks'):
                check_export_spec(model, args.export_subnets, data_config['input_size'], args.model_kwargs)
        amp_autocast, loss_scaler = create_amp(args, device, model_dtype)
        with setup_step('cannot read the data', 'check --data-dir, --dataset and the split flags'):
            datasets = create_datasets(args, data_config)
        mixup_active = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
        patch_size = model.get_patch_size() if args.naflex_loader else None
        with setup_step('cannot build the data loaders', 'check the data, augmentation and loader flags'):
            loaders = create_loaders(args, data_config, datasets, device, mixup_active, model_dtype, patch_size)
        check_transforms(loaders)  # one image through each transform, every RNG restored
        loader_train, loader_eval = loaders.train, loaders.eval
        resolve_lr(args, loaders.batch_reference)  # without --lr: timm's scaling of --lr-base to the global batch
        with setup_step('cannot build the loss', 'check --smoothing, --bce-*, --kd-* and the mixup flags'):
            task = create_task(args, model, stimulator, create_criterion(args, mixup_active), device, model_dtype,
                               loss_scaler)
        with setup_step(f'cannot create --opt {args.opt}', 'check --opt-eps, --opt-betas, --momentum, '
                        '--opt-kwargs, --weight-decay and --layer-decay'):
            optimizer = create_optimizer(args, model, task.criterion)
        if args.model_ema:  # before --resume, which restores it; the EMA is what eval_* reports, as in timm
            with setup_step('cannot set up --model-ema', 'check --model-ema-decay and --model-ema-force-cpu'):
                task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                               device='cpu' if args.model_ema_force_cpu else None)
        start_epoch, train_state = resume(args, task, optimizer, loss_scaler) if args.resume else (0, {})
        start_epoch = args.start_epoch if args.start_epoch is not None else start_epoch
        # Compile (the full pass, or block by block: never per skip pattern), then DDP: one all-reduce per step.
        with setup_step(f'cannot compile (--torchcompile {args.torchcompile}) or distribute the model',
                        'check --torchcompile, --torchcompile-mode and --stim-compile'):
            compile_and_distribute(task, args, device)
        eval_metric = args.eval_metric if loader_eval is not None else 'loss'  # no validation: rank by train loss
        updates_per_epoch = (len(loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
        with setup_step(f'cannot create --sched {args.sched}', 'check the --sched, --lr-*, --warmup-*, --decay-* '
                        'and --epochs flags'):
            lr_scheduler, num_epochs = create_lr_scheduler(args, optimizer, updates_per_epoch, start_epoch,
                                                           decreasing=eval_metric == 'loss')

    # Outputs, on rank 0 only: nothing has been written before this point. A run folder from elsewhere (resumed in
    # place) is checked for links first: a run never writes through one.
    saver, output_dir, contents = None, None, CheckpointContents(task)
    if args.rank == 0:
        output_dir = run_folder_path(args, data_config)
        saver = create_run_folder(args, output_dir, model, optimizer, loss_scaler, contents,
                                  decreasing=eval_metric == 'loss')
    if finetune is not None:
        _logger.info(f'Fine-tune of {finetune.label} ({finetune.source}): {finetune.describe()}')
        if args.rank == 0 and loader_eval is not None and not args.resume:  # what the model is now
            finetune.before = measure_subnets(plain_copy(args, task.model.state_dict(), device), args, data_config,
                                              device, os.path.join(output_dir, 'loafing_before'),
                                              f'{finetune.label} before the fine-tune')
    if train_state:  # resumed: continue the random streams where the interrupted run stopped
        restore_rng_states(train_state.get('rng'), args)

    best_metric, best_epoch, eval_metrics, results = None, None, {}, []
    end_epoch = num_epochs if args.stop_epoch is None else min(num_epochs, args.stop_epoch)
    for epoch in range(start_epoch, end_epoch):
        set_loader_epoch(loader_train, epoch)  # samplers and iterable datasets reshuffle per epoch
        task.set_stim_enabled(epoch >= args.stim_start_epoch)  # before --stim-start-epoch: plain training
        train_metrics = train_one_epoch(epoch, task, loader_train, optimizer, args, device, loss_scaler,
                                        amp_autocast, lr_scheduler, saver, loaders.mixup_fn, model_dtype, output_dir,
                                        loaders.loss_scale, loaders.batch_reference)
        if (epoch + 1) % args.val_interval and epoch + 1 != num_epochs:  # timm: no eval, no checkpoint
            _logger.info(f'Epoch {epoch}: no evaluation or checkpoint (--val-interval {args.val_interval})')
            if lr_scheduler is not None:
                lr_scheduler.step(epoch + 1, metric=None)
            continue
        # The model and, with --model-ema, the EMA: then eval_* and the best checkpoint are the EMA's.
        eval_metrics = evaluate(epoch, task, loader_train, loader_eval, args, device, amp_autocast,
                                model_dtype)
        latest_metric = (eval_metrics or train_metrics)[eval_metric]
        # Every rank hands over its RNG states (a collective), so a resumed run draws what this one would.
        contents.train_state = dict(rng=rng_states(args), loader_epoch=epoch + 1)
        if saver is not None:
            best_metric, best_epoch = save_epoch(epoch, saver, contents, optimizer, train_metrics,
                                                 eval_metrics, latest_metric, args)
        if lr_scheduler is not None:
            lr_scheduler.step(epoch + 1, latest_metric)
        result = dict(epoch=epoch, train=train_metrics)
        results.append(dict(result, validation=eval_metrics) if eval_metrics else result)

    log_results(args, results, eval_metric, best_metric, best_epoch, num_epochs, output_dir, start_time)
    if args.distributed:
        torch.distributed.destroy_process_group()
    # Rank 0 alone, on a plain copy of the final weights: --loafing-eval, --export-subnets, --push-to-hub.
    if args.rank == 0 and (args.push_to_hub or args.loafing_eval or args.export_subnets):
        export_run(args, task, output_dir, data_config, device, eval_metrics, best_metric, best_epoch, finetune)
    return 0


def save_epoch(epoch, saver, contents, optimizer, train_metrics, eval_metrics, metric, args):
    """Rank 0: check the weights finite, append the summary.csv row durably, then publish the checkpoint.

    In that order a diverged model saves nothing, and a crash never leaves a checkpoint without its row.
    Returns the saver's (best metric, best epoch).
    """
    contents.check_finite(epoch)
    lrs = [group['lr'] for group in optimizer.param_groups]
    write_summary_row(os.path.join(saver.checkpoint_dir, 'summary.csv'), epoch, train_metrics,
                      eval_metrics or {}, lr=sum(lrs) / len(lrs), log_wandb=args.log_wandb)
    return saver.save_checkpoint(epoch, metric=metric)


def log_results(args, results, eval_metric, best_metric, best_epoch, num_epochs, output_dir, start_time):
    """The end-of-training lines: the best epoch, how to continue after --stop-epoch, and (rank 0) timm's
    parsable `--result` summary of the (up to) 10 best epochs, best last."""
    if best_metric is not None:
        _logger.info(f'*** Best {eval_metric}: {best_metric:.4f} (epoch {best_epoch}); '
                     f'{(time.time() - start_time) / 60:.1f} min in all')
    if output_dir is not None and args.stop_epoch is not None and args.stop_epoch < num_epochs:
        _logger.info(f"Stopped after epoch {args.stop_epoch} of {num_epochs}: continue with the same flags "
                     f"and --resume {os.path.join(output_dir, 'last.pth.tar')} "
                     f"--experiment {os.path.basename(output_dir)}")
    if args.rank == 0:
        ranked = sorted(results, key=lambda r: r.get('validation', r['train']).get(eval_metric, 0),
                        reverse=eval_metric == 'loss')
        print(f'--result\n{json.dumps(ranked[-10:], indent=4)}')


# ---------------------------------------------------------------------------------------- the training loop

def set_loader_epoch(loader, epoch: int) -> None:
    """Tell the dataset (iterable: wds/tfds/hfids), batch sampler or sampler which epoch starts."""
    if hasattr(loader.dataset, 'set_epoch'):
        loader.dataset.set_epoch(epoch)
    if hasattr(loader.batch_sampler, 'set_epoch'):
        loader.batch_sampler.set_epoch(epoch)
    elif hasattr(loader.sampler, 'set_epoch'):
        loader.sampler.set_epoch(epoch)


def train_one_epoch(epoch, task, loader, optimizer, args, device, loss_scaler=None, amp_autocast=nullcontext,
                    lr_scheduler=None, saver=None, mixup_fn=None, model_dtype=None, output_dir=None,
                    loss_scale='none', batch_reference=None) -> OrderedDict:
    """One epoch: a forward (full net + subnets) and a backward per batch, an update every
    --grad-accum-steps batches.

    With batches of varying size (--train-img-sizes, --naflex-loader), `loss_scale` ('sqrt' / 'linear') scales
    each batch's loss by its size relative to `batch_reference`, as timm does.
    """
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
    grad_steps = None  # (accumulation steps, loss scale) last given to the task for in-forward subnet backward
    optimizer.zero_grad()
    for batch_idx, (input, target) in enumerate(bar or loader):
        data_time.update(time.time() - end)
        need_update = batch_idx == num_batches - 1 or (batch_idx + 1) % accum == 0
        steps = last_accum if batch_idx >= num_batches - last_accum else accum
        if args.no_prefetcher:  # the prefetcher has already moved (and mixed) the batch
            input, target = to_device(input, device, model_dtype), target.to(device=device)
            if mixup_fn is not None:
                input, target = mixup_fn(input, target)
        if args.channels_last and torch.is_tensor(input):
            input = input.contiguous(memory_format=torch.channels_last)
        n = batch_size(input)
        scale = batch_loss_scale(n, loss_scale, batch_reference, args, device)
        # Memory-lean subnets back-propagate inside forward, so the task scales by 1 / accumulation steps (and the
        # batch's loss scale) itself: set when it changes, no host-device sync (the AMP scale was given once).
        if stimulator is not None and (torch.is_tensor(scale) or (steps, scale) != grad_steps):
            task.set_grad_multiplier(scale / steps)
            grad_steps = (steps, scale)

        # DDP all-reduces the gradients on the last micro-step of an accumulation only.
        with task.no_sync() if not need_update else nullcontext():
            with amp_autocast():
                out = task(input, target)
            loss = out['loss'] / steps
            logged = loss.detach()  # timm logs this divided loss times the accumulation steps (float64 arithmetic)
            if loss_scale != 'none':
                loss = scale * loss
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

        # Running sums stay on the device: read back (one sync) only at log points.
        count += n
        stim_loss = out.get('stim_loss', 0 * out['main_loss'])
        sums += torch.stack([logged.double() * steps, out['main_loss'].double(), stim_loss.double()]) * n
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
            percent = 100. * (update_idx + 1) / updates_per_epoch
            text = (f'Train: {epoch} [{update_idx:>4d}/{updates_per_epoch} '
                    f'({percent:>3.0f}%)]  Loss: {loss_avg:#.4g}  {stim_text}'
                    f'Step: {step_time.val:.3f}s  {n * accum * args.world_size / step_time.val:>7.1f} img/s  '
                    f'LR: {sum(lrs) / len(lrs):.3e}  Data: {data_time.avg:.3f}s')
            if args.rank == 0:
                (bar.write if bar else _logger.info)(text)
                if args.save_images and output_dir and torch.is_tensor(input):
                    _save_batch_image(input, os.path.join(output_dir, f'train-batch-{batch_idx}.jpg'))
        # --recovery-interval: every N updates; as in timm, a recovery checkpoint resumes at the next epoch
        if saver is not None and args.recovery_interval and (update_idx + 1) % args.recovery_interval == 0 \
                and torch.isfinite(sums).all():
            saver.save_recovery(epoch, batch_idx=update_idx)
        if lr_scheduler is not None:  # no running-loss metric: no scheduler reads it per update, and it would sync
            lr_scheduler.step_update(num_updates=num_updates)
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


def _progress_bar(loader, args, desc):
    """A tqdm bar when tqdm is installed and stdout is a terminal (rank 0 only), else None."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    if args.rank != 0 or not sys.stdout.isatty():
        return None
    return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)


def to_device(input, device, dtype=None):
    """A batch on the device: an image tensor (cast to `dtype`) or a NaFlex dict (its float tensors cast)."""
    if isinstance(input, dict):
        return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in input.items()}
    return input.to(device=device, dtype=dtype)


def batch_size(input) -> int:
    """Images in a batch: an NCHW tensor or a NaFlex dict of patch sequences."""
    return (input['patches'] if isinstance(input, dict) else input).shape[0]


def batch_loss_scale(n: int, mode: str, reference: Optional[float], args, device):
    """timm's per-batch loss scale for batches of varying size: 1, n / reference or its square root.

    Under DDP with NaFlex batches (whose size differs per rank) it also weighs this rank by its share of the
    global batch: a small all-reduce, whose result stays on the device.
    """
    if mode == 'none' or reference is None:
        return 1.0
    scale = n / reference if mode == 'linear' else (n / reference) ** 0.5
    if args.distributed and args.naflex_loader:
        total = torch.full((), float(n), device=device)  # a fill on the device: no copy from the host per step
        torch.distributed.all_reduce(total)
        scale = scale * args.world_size * n / total
    return scale


def _save_batch_image(input, path: str) -> None:
    """--save-images: the (augmented, normalised) training batch as one image grid."""
    import torchvision.utils
    torchvision.utils.save_image(input, path, padding=0, normalize=True)


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
            f'non-finite training loss ({means[0]:.4g}) in epoch {epoch} by update {update_idx + 1}; '
            f'training stopped, the last good checkpoint is kept (last.pth.tar in the output folder, once an '
            f'epoch has finished); lower --lr or use --clip-grad')
    return means


# ------------------------------------------------------------------------------------------------ evaluation

def evaluate(epoch, task, loader_train, loader_eval, args, device, amp_autocast=nullcontext,
             model_dtype=None):
    """Validate the model and, with --model-ema, its EMA; the last one evaluated gives eval_* (None without a
    validation split), so with an EMA the reported metrics and the best checkpoint are the EMA's."""
    eval_model = task.get_eval_model()
    distribute = args.distributed and args.dist_bn in ('broadcast', 'reduce')
    if loader_eval is None:
        if distribute:
            distribute_bn(eval_model, args.world_size, args.dist_bn == 'reduce')
        return None
    eval_metrics = None
    ema = task.get_eval_model(ema=True) if task.has_ema() and not args.model_ema_force_cpu else None
    for name, net in (('model', eval_model), ('EMA', ema)):
        if net is None:
            continue
        if args.stim_bn_recal:  # the authors re-estimate BN statistics before every evaluation
            used = recalibrate_bn(net, loader_train, args.stim_bn_recal, device=device, dtype=model_dtype,
                                  autocast=amp_autocast)
            _logger.info(f'Re-estimated BatchNorm statistics of the {name} on {used} training images '
                         f'per process')
        if distribute:  # --dist-bn: every rank evaluates with the same BN statistics
            distribute_bn(net, args.world_size, args.dist_bn == 'reduce')
        eval_metrics = validate(net, loader_eval, args, amp_autocast, model_dtype,
                                log_suffix=' (EMA)' if name == 'EMA' else '')
        check_finite_metrics(epoch, eval_metrics, f'{name} validation')
        _logger.info(f"Eval{' (EMA)' if name == 'EMA' else ''}: {epoch}  Loss: {eval_metrics['loss']:.4f}  "
                     f"Acc@1: {eval_metrics['top1']:.2f}  Acc@5: {eval_metrics['top5']:.2f}")
    return eval_metrics


@torch.no_grad()
def validate(model, loader, args, amp_autocast=nullcontext, model_dtype=None, log_suffix='') -> OrderedDict:
    """Loss and top-1/top-5 (%) of the full network on the validation set, summed exactly over ranks.

    Logs timm's `Test:` line every --log-interval batches and at the last (this process's running values).
    """
    model.eval()
    # Under DDP the sampler pads the last batches: count only the first num_valid_samples images.
    limit = getattr(loader.sampler, 'num_valid_samples', None) if args.distributed else None
    sums = torch.zeros(4, dtype=torch.float64, device=args.device)  # loss, top-1 hits, top-5 hits, samples
    seen, last_idx, start = 0, len(loader) - 1, time.time()
    for batch_idx, (input, target) in enumerate(loader):
        if args.no_prefetcher:
            input, target = to_device(input, args.device, model_dtype), target.to(device=args.device)
        if args.channels_last and torch.is_tensor(input):
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
            batch = torch.stack([loss, top1 / 100, top5 / 100, torch.ones_like(loss)]).double() * n
            sums += batch
            if args.rank == 0 and (batch_idx % args.log_interval == 0 or batch_idx == last_idx):
                _log_test_line(batch_idx, last_idx, batch.tolist(), sums.tolist(), start, log_suffix)
    if args.distributed:
        torch.distributed.all_reduce(sums)
    loss, top1, top5, n = sums.tolist()
    return OrderedDict(loss=loss / max(n, 1), top1=100 * top1 / max(n, 1), top5=100 * top5 / max(n, 1))


def _log_test_line(batch_idx: int, last_idx: int, batch: list, running: list, start: float, suffix: str) -> None:
    """timm's per-interval validation line: this batch's loss and accuracy, then the running mean."""
    now, mean = [v / batch[3] for v in batch[:3]], [v / running[3] for v in running[:3]]
    _logger.info(f'Test{suffix}: [{batch_idx:>4d}/{last_idx}]  Time: {(time.time() - start) / (batch_idx + 1):.3f}s  '
                 f'Loss: {now[0]:>7.3f} ({mean[0]:>6.3f})  Acc@1: {100 * now[1]:>7.3f} ({100 * mean[1]:>7.3f})  '
                 f'Acc@5: {100 * now[2]:>7.3f} ({100 * mean[2]:>7.3f})')


if __name__ == '__main__':
    sys.exit(main())
