"""What train_stim.py builds before its first epoch: model, stimulator, precision, data, loss, lr, schedule.

Each factory turns parsed train_stim.py flags into one timm object, the way timm's train.py does, and raises
``UsageError`` (exit code 2) for input it cannot use, so every bad input surfaces before anything is written.
train_stim.py calls them in timm's order, which keeps `--stim none` drawing the same random numbers as timm.
"""
import importlib
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional, Tuple

import torch
import torch.nn as nn

import timm
from timm.data import AugMixDataset, FastCollateMixup, Mixup, create_loader, create_naflex_loader
from timm.layers import convert_splitbn_model, set_fast_norm
from timm.loss import BinaryCrossEntropy, JsdCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import NativeScaler, init_distributed_device, set_jit_fuser

from .checkpoint import check_model_name
from .cli import UsageError, one_line
from .data import DIGITS_INFO, create_dataset_or_digits, fixed_subset, is_digits
from .distill import create_distillation_loss, optimizer_module
from .sizes import smaller_input_kwargs
from .stimulator import Stimulator, create_stim_config
from .task import StimulativeTask

_logger = logging.getLogger(__name__)


def init_runtime(args) -> Tuple[torch.device, Optional[torch.dtype]]:
    """Import --device-modules, join torchrun's process group, quiet ranks > 0, set --fuser / --fast-norm.

    Returns (device, --model-dtype as a torch dtype or None).
    """
    for module in args.device_modules or []:  # e.g. a backend that registers a device type
        importlib.import_module(module)
    device = init_distributed_device(args)
    if args.rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    _logger.info(f'Distributed: {args.world_size} processes, this is rank {args.rank} on {device}'
                 if args.distributed else f'Training with a single process on {device}')
    if args.fuser:
        set_jit_fuser(args.fuser)
    if args.fast_norm:
        set_fast_norm()
    return device, getattr(torch, args.model_dtype) if args.model_dtype else None


def apply_digits_defaults(args, recipe: str) -> None:
    """On the built-in digits, fill the data config (classes, size, mean/std...) no flag or config has set."""
    if args.digits_recipe:
        _logger.info(f'Built-in digits dataset: defaults from {recipe} (flags override them)')
    if not is_digits(args.dataset, args.data_dir):
        return
    args.num_classes = args.num_classes or DIGITS_INFO['num_classes']
    if args.img_size is None and args.input_size is None:
        args.img_size = DIGITS_INFO['img_size']
    for key in ('mean', 'std', 'crop_pct', 'interpolation'):
        setattr(args, key, getattr(args, key) or DIGITS_INFO[key])


# ------------------------------------------------------------------------------------------ model, stimulator

def create_stim_options(args):
    """StimConfig from --stim and the --stim-* overrides, or None for --stim none.

    The effective values (preset + overrides) are written back into args, so args.yaml records them.
    """
    if args.stim == 'none':
        return None
    flags = dict(space='stim_space', loss='stim_loss', weight='stim_weight', temperature='stim_temperature',
                 amplitude='stim_amplitude', num_subnets='stim_subnets', min_scale='stim_min_scale',
                 sizes='stim_sizes', bn='stim_bn')
    if args.naflex_loader and args.stim_min_scale is None:  # patch-sequence batches cannot be resized
        args.stim_min_scale = 1.0
        if args.stim == 'st++':
            _logger.info('ST++ smaller subnet inputs off: --naflex-loader batches are patch sequences of varying '
                         'length already')
    main_logits = {'standardized': True, 'raw': False}.get(args.stim_main_logits)
    try:
        config = create_stim_config(
            args.stim, per_rank=args.stim_per_rank, seed=args.seed, size_fallback=args.stim_size_fallback,
            memory_lean=args.stim_memory_lean, standardize_main=main_logits,
            **{field: getattr(args, flag) for field, flag in flags.items()})
    except ValueError as e:
        raise UsageError(str(e)) from None
    for field, flag in flags.items():
        setattr(args, flag, getattr(config, field) if field != 'sizes' else args.stim_sizes)
    args.stim_main_logits = 'standardized' if config.standardize_main else 'raw'
    return config


def create_model(args, stim_config) -> nn.Module:
    """timm.create_model, plus the kwargs a ViT needs for smaller subnet inputs (kept in args.model_kwargs)."""
    name = args.model
    if not name.startswith(('hf-hub:', 'local-dir:')):
        try:
            check_model_name(name)
        except ValueError as e:
            raise UsageError(str(e)) from None
    kwargs = dict(args.model_kwargs or {})
    # min_scale None: the preset decides by resolution once the data config is known, so allow other sizes
    if stim_config is not None and (stim_config.min_scale is None or stim_config.min_scale < 1.0 or stim_config.sizes):
        for key, value in smaller_input_kwargs(name).items():
            kwargs.setdefault(key, value)
    args.model_kwargs = kwargs  # recorded in args.yaml, checkpoints and the Hub export's model_args
    factory = {}  # --pretrained-path: a local weights file instead of the model's default source, head adapted
    if args.pretrained_path:
        factory['pretrained_cfg_overlay'] = dict(file=args.pretrained_path, num_classes=-1)
    in_chans = args.in_chans or (args.input_size[0] if args.input_size else 3)
    try:  # timm.create_model drops the None ones, so a model that does not take e.g. bn_eps still builds
        model = timm.create_model(
            name, pretrained=args.pretrained, in_chans=in_chans, num_classes=args.num_classes,
            drop_rate=args.drop, drop_path_rate=args.drop_path, drop_block_rate=args.drop_block,
            global_pool=args.gp, bn_momentum=args.bn_momentum, bn_eps=args.bn_eps, scriptable=args.torchscript,
            checkpoint_path=args.initial_checkpoint, **factory, **kwargs)
    except TypeError as e:
        raise UsageError(f'cannot create {name} with {kwargs}: {e}') from None
    if args.naflex_loader and not hasattr(model, 'get_patch_size'):  # it would fail on the first patch batch
        raise UsageError(f'--naflex-loader needs a NaFlex model that takes patch sequences (get_patch_size(), e.g. '
                         f'naflexvit_base_patch16_gap); {name} takes images: drop --naflex-loader')
    with torch.no_grad():
        if args.head_init_scale is not None:
            model.get_classifier().weight.mul_(args.head_init_scale)
            model.get_classifier().bias.mul_(args.head_init_scale)
        if args.head_init_bias is not None:
            model.get_classifier().bias.fill_(args.head_init_bias)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    args.num_classes = model.num_classes
    _logger.info(f'Model {safe_model_name(name)} created, param count: {sum(p.numel() for p in model.parameters())}')
    return model


def prepare_model(model: nn.Module, args, device, model_dtype=None) -> nn.Module:
    """timm's model conversions, in timm's order: split BN, device and dtype, channels-last, sync BN, TorchScript."""
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
    return model


def create_train_stimulator(model: nn.Module, stim_config, args, full_size: int) -> Optional[Stimulator]:
    """The Stimulator that samples subnets of `model`, or None for --stim none.

    It finds the residual blocks and checks (one dry forward) that smaller inputs work: a model or space that
    does not fit is bad input.
    """
    if stim_config is None:
        return None
    try:
        stimulator = Stimulator(model, stim_config, blocks=args.stim_blocks, full_size=full_size, rank=args.rank,
                                full_sizes=args.train_img_sizes)  # scheduled resolutions: a size range per size
    except ValueError as e:  # NoResidualBlocksError, SmallerInputsError, a space or sizes that don't fit
        raise UsageError(str(e)) from None
    args.stim_min_scale = stimulator.config.min_scale  # the preset's range at this size, recorded in args.yaml
    return stimulator


def create_amp(args, device, model_dtype=None) -> Tuple[Callable, Optional[NativeScaler]]:
    """(autocast context factory, loss scaler or None) for --amp / --amp-dtype; float16 on CUDA scales losses."""
    if not args.amp:
        _logger.info(f'AMP off: training in {model_dtype or torch.float32}')
        return nullcontext, None
    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype)
    loss_scaler = NativeScaler(device='cuda') if device.type == 'cuda' and amp_dtype == torch.float16 else None
    _logger.info(f'Mixed precision: autocast to {args.amp_dtype}' + (' with loss scaling' if loss_scaler else ''))
    return amp_autocast, loss_scaler


def create_task(args, model, stimulator, criterion, device, model_dtype=None, loss_scaler=None):
    """The StimulativeTask that runs `model` and its subnets in one forward, given the loss scaler once.

    With --kd-model-name the main loss becomes distillation from that teacher (--kd-distill-type logit, feature or
    token, timm's losses and weights), built here as timm builds its teacher: after the loaders, before the
    optimizer.
    """
    criterion = criterion.to(device)
    if args.kd_model_name:
        try:
            criterion = create_distillation_loss(args, model, criterion, device, model_dtype)
        except (RuntimeError, OSError, ValueError) as e:  # unknown name, no weights offline, wrong classes
            raise UsageError(f'--kd-model-name {args.kd_model_name}: the teacher could not be built '
                             f'({one_line(e)[:300]}); give a timm model with pretrained weights, hf-hub:owner/name '
                             f'or local-dir:/path/to/model_folder') from None
        _logger.info(f'Knowledge distillation ({args.kd_distill_type}) from {args.kd_model_name}: '
                     f'{criterion.extra_repr()}')
    task = StimulativeTask(model, criterion, stimulator, device=device, dtype=model_dtype,
                           verbose=args.rank == 0).to(device)
    task.set_loss_scaler(loss_scaler)  # subnet passes that back-propagate inside forward scale like the loop
    return task


def create_optimizer(args, model, criterion=None):
    """timm's optimizer for the --opt* flags (and --opt-kwargs), logged with its settings; it also trains the
    loss's own parameters (a feature-distillation projection), as timm's does."""
    optimizer = create_optimizer_v2(optimizer_module(model, criterion), **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    settings = dict(optimizer.defaults, weight_decay=args.weight_decay)
    _logger.info(f'Created {type(optimizer).__name__} ({args.opt}) optimizer: '
                 + ', '.join(f'{k}: {v}' for k, v in settings.items()))
    return optimizer


def compile_and_distribute(task, args, device) -> None:
    """--torchcompile (the full pass, or block by block: never per skip pattern), then DDP under torchrun."""
    if args.torchcompile:
        task.compile(backend=args.torchcompile, mode=args.torchcompile_mode, scope=args.stim_compile)
        teacher = getattr(task.criterion, 'teacher', None)
        if teacher is not None:  # a distillation teacher: its logits (or pooled features) path, as timm compiles it
            teacher.compile(backend=args.torchcompile, mode=args.torchcompile_mode,
                            compile_features=args.kd_distill_type == 'feature')
    if not args.distributed:
        return
    task.prepare_distributed(device_ids=[device.index] if device.type == 'cuda' else None,
                             broadcast_buffers=not args.no_ddp_bb)
    if task.has_ema() and not args.model_ema_force_cpu:  # each rank built its own weights: the EMA starts
        # from rank 0's on every rank, as DDP's model does
        for tensor in task.get_trainable_module(ema=True).state_dict().values():
            torch.distributed.broadcast(tensor, 0)


# ----------------------------------------------------------------------------------------------------- data

def create_datasets(args, data_config) -> list:
    """Train and validation (None when --val-split is '') datasets; a bad data dir / dataset raises
    DataConfigError before any work."""
    img_mode = args.input_img_mode or ('RGB' if data_config['input_size'][0] == 3 else 'L')
    kwargs = dict(img_size=data_config['input_size'][-1], class_map=args.class_map, download=args.dataset_download,
                  batch_size=args.batch_size, input_img_mode=img_mode, input_key=args.input_key,
                  target_key=args.target_key, trust_remote_code=args.dataset_trust_remote_code)
    train = create_dataset_or_digits(args.dataset, args.data_dir, args.train_split, is_training=True,
                                     seed=args.seed, repeats=args.epoch_repeats, num_samples=args.train_num_samples,
                                     **kwargs)
    val = None
    if args.val_split:
        val = create_dataset_or_digits(args.dataset, args.data_dir, args.val_split, is_training=False,
                                       num_samples=args.val_num_samples, **kwargs)
    # timm ignores --train/val-num-samples for map-style datasets; here they take a fixed random subset
    train = fixed_subset(train, args.train_num_samples)
    val = fixed_subset(val, args.val_num_samples) if val is not None else None
    for name, dataset in (('training', train), ('validation', val)):
        check_first_image(dataset, name, args)
    if args.aug_splits > 1:  # AugMix: several augmented views of each image (plain training only)
        train = AugMixDataset(train, num_splits=args.aug_splits)
    return train, val


def check_first_image(dataset, name: str, args) -> None:
    """Decode the first image of an image folder (no transform is set yet, so no random number is drawn): a
    folder of files with image names that do not decode is bad input, found before anything is written."""
    if dataset is None or not args.data_dir or args.dataset \
            or isinstance(dataset, torch.utils.data.IterableDataset) or len(dataset) == 0:
        return
    try:
        dataset[0]
    except Exception as e:
        raise UsageError(f'cannot read the first {name} image in {args.data_dir} ({type(e).__name__}: '
                         f'{one_line(e)[:200]}); check that --data-dir holds decodable images') from None


@dataclass
class Loaders:
    """What create_loaders returns: the loaders and how the loop scales each batch's loss.

    `batch_reference` is the batch size the lr is scaled to and per-batch losses are scaled against: the
    scheduled loader's policy-average batch size, else --batch-size. `loss_scale` is 'none', 'sqrt' or 'linear'
    (--variable-batch-loss-scale, or --naflex-loss-scale with --naflex-loader).
    """
    train: Any
    eval: Optional[Any]
    mixup_fn: Optional[Callable]
    batch_reference: float
    loss_scale: str = 'none'


def create_loaders(args, data_config, datasets, device, mixup_active: bool, model_dtype=None,
                   patch_size=None) -> Loaders:
    """timm's loaders for train (augmentation, mixup) and eval (None without a validation split).

    The train loader is timm's create_loader (with --train-img-sizes: its scheduled-resolution batch sampler) or,
    with --naflex-loader, timm's NaFlex loader (batches of patch sequences at several lengths, for NaFlex ViTs,
    `patch_size` = the model's). With the prefetcher (default) mixup runs in the collate and normalisation on the
    device; with --no-prefetcher the returned mixup_fn mixes each batch in the training loop.
    """
    mixup_args = dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                      prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                      label_smoothing=args.smoothing, num_classes=args.num_classes)
    if args.aug_repeats and (not args.distributed or isinstance(datasets[0], torch.utils.data.IterableDataset)):
        raise UsageError('--aug-repeats needs distributed training (torchrun) on a map-style dataset, as in timm')
    prefetcher = not args.no_prefetcher
    common = dict(mean=data_config['mean'], std=data_config['std'], distributed=args.distributed,
                  pin_memory=args.pin_mem, device=device, use_prefetcher=prefetcher,
                  img_dtype=model_dtype or torch.float32)
    use_train_interpolation = args.train_interpolation and not args.no_aug
    augment = dict(
        batch_size=args.batch_size, is_training=True, no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode,
        re_count=args.recount, re_split=args.resplit, train_crop_mode=args.train_crop_mode, scale=args.scale,
        ratio=args.ratio, hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
        color_jitter_prob=args.color_jitter_prob, grayscale_prob=args.grayscale_prob,
        gaussian_blur_prob=args.gaussian_blur_prob, auto_augment=args.aa, num_aug_repeats=args.aug_repeats,
        num_aug_splits=args.aug_splits if args.aug_splits > 1 else 0,
        interpolation=args.train_interpolation if use_train_interpolation else data_config['interpolation'],
        num_workers=args.workers, worker_seeding=args.worker_seeding)
    eval_kwargs = dict(batch_size=args.validation_batch_size or args.batch_size, is_training=False,
                       interpolation=data_config['interpolation'], crop_pct=data_config['crop_pct'],
                       num_workers=args.workers)
    if args.distributed and ('tfds' in args.dataset or 'wds' in args.dataset):
        eval_kwargs['num_workers'] = min(2, args.workers)  # less DDP padding
    if args.naflex_loader:
        loaders = _create_naflex_loaders(args, datasets, mixup_active, mixup_args, patch_size, common, augment,
                                         eval_kwargs)
    else:
        collate_fn = FastCollateMixup(**mixup_args) if mixup_active and prefetcher else None
        loader_train = create_loader(
            datasets[0], input_size=data_config['input_size'], collate_fn=collate_fn,
            use_multi_epochs_loader=args.use_multi_epochs_loader, input_size_choices=args.train_img_sizes,
            batch_size_choices=args.train_batch_sizes, batch_choice_weights=args.train_size_probs,
            batch_choice_seed=args.seed, batch_choice_schedule=args.train_size_schedule,
            batch_schedule_epochs=args.epochs if args.train_size_schedule == 'progressive' else None,
            batch_schedule_spread=args.train_size_schedule_spread,
            batch_schedule_random_mix=args.train_size_random_mix, num_batches=args.train_batches_per_epoch,
            **augment, **common)
        loader_eval = None if datasets[1] is None else create_loader(
            datasets[1], input_size=data_config['input_size'], **eval_kwargs, **common)
        loaders = Loaders(loader_train, loader_eval, Mixup(**mixup_args) if mixup_active and not prefetcher else None,
                          float(args.batch_size))
        if args.train_img_sizes is not None:
            sampler = loader_train.batch_sampler
            loaders.batch_reference, loaders.loss_scale = sampler.average_batch_size, args.variable_batch_loss_scale
            _logger.info(f'Scheduled training resolutions {args.train_img_sizes} with batch sizes '
                         f'{sampler.batch_sizes} ({args.train_size_schedule}); {len(sampler)} batches per epoch, '
                         f'policy-average batch size {sampler.average_batch_size:.2f}')
    if len(loaders.train) == 0:
        raise UsageError(f'{len(datasets[0])} training images make no full batch of {args.batch_size} per process')
    return loaders


def _create_naflex_loaders(args, datasets, mixup_active, mixup_args, patch_size, common, augment,
                           eval_kwargs) -> Loaders:
    """--naflex-loader: timm's NaFlex loaders (train at --naflex-train-seq-lens, eval at --naflex-max-seq-len)."""
    mixup_fn = None
    if mixup_active:
        from timm.data import NaFlexMixup
        mixup_fn = NaFlexMixup(**{k: v for k, v in mixup_args.items() if k not in ('mode', 'cutmix_minmax')})
    patches = dict(patch_size=patch_size)
    if args.naflex_patch_sizes:  # variable patch sizes, drawn per batch
        patches = dict(patch_size_choices=args.naflex_patch_sizes, patch_size_choice_probs=args.naflex_patch_size_probs)
    channels_last = not args.naflex_patchify_channels_first
    loader_train = create_naflex_loader(
        dataset=datasets[0], train_seq_lens=args.naflex_train_seq_lens, mixup_fn=mixup_fn, rank=args.rank,
        world_size=args.world_size, patchify_channels_last=channels_last, **patches, **augment, **common)
    loader_eval = None if datasets[1] is None else create_naflex_loader(
        dataset=datasets[1], patch_size=patch_size, max_seq_len=args.naflex_max_seq_len,
        patchify_channels_last=channels_last, **eval_kwargs, **common)
    _logger.info(f'NaFlex loader: sequence lengths {args.naflex_train_seq_lens}, patch size '
                 f'{args.naflex_patch_sizes or patch_size}')
    return Loaders(loader_train, loader_eval, None, float(args.batch_size), args.naflex_loss_scale)


# ------------------------------------------------------------------------------------ loss, lr, schedule

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


def resolve_lr(args, batch_reference: Optional[float] = None) -> None:
    """timm's rule: without --lr, lr = lr_base * (global batch / lr_base_size), linearly or by its square root.

    The per-process batch is `batch_reference` (scheduled resolutions: the policy-average batch), else --batch-size.

    args.lr_given keeps the unresolved value for args.yaml, so a recipe rescales when re-used at another batch.
    """
    args.lr_given = args.lr
    if args.lr:
        return
    global_batch = (batch_reference or args.batch_size) * args.world_size * args.grad_accum_steps
    scale = args.lr_base_scale or ('sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear')
    args.lr = args.lr_base * (global_batch / args.lr_base_size) ** (0.5 if scale == 'sqrt' else 1.0)
    _logger.info(f'Learning rate {args.lr:.4g}: {scale} scaling of --lr-base {args.lr_base} to a batch of '
                 f'{global_batch:g}')


def create_lr_scheduler(args, optimizer, updates_per_epoch: int, start_epoch: int, decreasing: bool):
    """timm's scheduler for the flags, advanced to `start_epoch` on resume; returns (scheduler, epochs)."""
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric=decreasing), updates_per_epoch=updates_per_epoch)
    if lr_scheduler is not None and start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)
    stop = f', stopping after {args.stop_epoch}' if args.stop_epoch else ''
    _logger.info(f'Scheduled epochs: {num_epochs}{stop}; '
                 f"lr stepped per {'update' if args.sched_on_updates else 'epoch'}")
    return lr_scheduler, num_epochs
