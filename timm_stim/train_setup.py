"""What train_stim.py builds before its first epoch: model, stimulator, precision, data, loss, lr, schedule.

Each factory turns parsed train_stim.py flags into one timm object, the way timm's train.py does, and raises
``UsageError`` (exit code 2) for input it cannot use, so every bad input surfaces before anything is written.
train_stim.py calls them in timm's order, which keeps `--stim none` drawing the same random numbers as timm.
"""
import importlib
import logging
import os
import random
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Callable, Iterator, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

import timm
from timm.data import AugMixDataset, FastCollateMixup, Mixup, create_loader, create_naflex_loader
from timm.data.scheduled_sampler import ScheduledTransformDataset
from timm.layers import convert_splitbn_model, convert_sync_batchnorm, set_fast_norm
from timm.loss import BinaryCrossEntropy, JsdCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import NativeScaler, init_distributed_device, set_jit_fuser

from .checkpoint import (check_model_name, clean_state_dict, first_non_finite, load_state_dict_strict, read_checkpoint,
                         read_checkpoint_metadata, select_state_dict)
from .cli import UsageError, one_line, setup_step
from .data import DIGITS_INFO, create_dataset_or_digits, fixed_subset, is_digits
from .distill import create_distillation_loss, optimizer_module
from .sizes import smaller_input_kwargs
from .stimulator import AUTHORS_EPOCHS, Stimulator, create_stim_config, default_standardize_main
from .task import StimulativeTask

_logger = logging.getLogger(__name__)


SINGLE_RANK_DDP_ENV = 'TIMM_STIM_SINGLE_RANK_DDP'


def init_runtime(args) -> Tuple[torch.device, Optional[torch.dtype]]:
    """Import --device-modules, set timm's CUDA speed flags, join torchrun's process group, quiet ranks > 0, set
    --fuser / --fast-norm.

    As timm's train.py: with CUDA available, cudnn.benchmark (autotune each new conv shape once) and TF32
    matmuls. timm only joins a process group for more than one process; with TIMM_STIM_SINGLE_RANK_DDP=1 under
    `torchrun --nproc_per_node=1` a 1-process group is joined too, so one device runs the DDP code paths.
    Returns (device, --model-dtype as a torch dtype or None).
    """
    for module in args.device_modules or []:  # e.g. a backend that registers a device type
        importlib.import_module(module)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    device = init_distributed_device(args)
    if not args.distributed and os.environ.get(SINGLE_RANK_DDP_ENV) == '1':
        device = _join_single_rank_group(args, device)
    if args.rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    _logger.info(f'Distributed: {args.world_size} processes, this is rank {args.rank} on {device}'
                 if args.distributed else f'Training with a single process on {device}')
    if device.type == 'cuda':
        _logger.info('CUDA: cudnn.benchmark on, TF32 matmuls (as timm train.py); cuDNN autotunes every new input '
                     'shape once, so the first steps (and each new ST++ subnet size) run slower')
    if args.fuser:
        set_jit_fuser(args.fuser)
    if args.fast_norm:
        set_fast_norm()
    return device, getattr(torch, args.model_dtype) if args.model_dtype else None


def _join_single_rank_group(args, device: torch.device) -> torch.device:
    """TIMM_STIM_SINGLE_RANK_DDP=1: a process group of one (NCCL on CUDA, else gloo) from torchrun's environment,
    and args set as timm sets them for a distributed run, so DDP wraps the model on a single device."""
    missing = [k for k in ('MASTER_ADDR', 'MASTER_PORT') if k not in os.environ]
    if missing or os.environ.get('WORLD_SIZE', '1') != '1':
        raise UsageError(f'{SINGLE_RANK_DDP_ENV}=1 needs a one-process launch with MASTER_ADDR and MASTER_PORT set '
                         f'(torchrun --nproc_per_node=1 sets them); missing: {", ".join(missing) or "none"}, '
                         f'WORLD_SIZE={os.environ.get("WORLD_SIZE")}')
    backend = 'nccl' if device.type == 'cuda' else 'gloo'
    torch.distributed.init_process_group(backend=backend, init_method='env://', world_size=1, rank=0)
    args.distributed, args.world_size, args.rank = True, 1, 0
    args.local_rank = int(os.environ.get('LOCAL_RANK', 0))
    if device.type == 'cuda':  # DDP's device_ids need the index, as timm's distributed path sets it
        device = torch.device('cuda', args.local_rank)
        torch.cuda.set_device(device)
        args.device = str(device)
    return device


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

def _default_main_logits(args) -> bool:
    """Whether ST++'s main loss sees standardized logits when --stim-main-logits is unset: as in the run resumed,
    whatever today's default; else by the schedule's length (`default_standardize_main`). Logged."""
    resumed = getattr((read_checkpoint_metadata(args.resume) or {}).get('args'), 'stim_main_logits', None) \
        if args.resume else None
    if resumed in ('standardized', 'raw'):
        _logger.info(f'ST++ main loss on {resumed} logits, as in the run resumed')
        return resumed == 'standardized'
    standardized = default_standardize_main(args.epochs)
    kind = "standardized (the authors')" if standardized else 'raw'
    _logger.info(f'ST++ main loss on {kind} logits for a {args.epochs}-epoch schedule (standardized from '
                 f'{AUTHORS_EPOCHS} epochs up, raw below: docs/results/stpp_lowres.md; --stim-main-logits '
                 f'picks either)')
    return standardized


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
    if main_logits is None and config.loss == 'kl-':  # left open: the schedule (or the run resumed) decides
        config = replace(config, standardize_main=_default_main_logits(args))
    for field, flag in flags.items():
        setattr(args, flag, getattr(config, field) if field != 'sizes' else args.stim_sizes)
    args.stim_main_logits = 'standardized' if config.standardize_main else 'raw'
    return config


def create_model(args, stim_config, finetune=None) -> nn.Module:
    """timm.create_model, plus the kwargs a ViT needs for smaller subnet inputs (kept in args.model_kwargs).

    Weights from elsewhere: `finetune` (timm_stim.finetune: the source's weights, its classifier kept when the
    class count is the same), --pretrained-path (with --pretrained) and --initial-checkpoint, all read safely.
    """
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
    # weights handed to timm, which re-initialises the classifier when their class count (-1: always) differs
    factory, pretrained, source = {}, None, None
    if finetune is not None and finetune.state_dict is not None:
        pretrained, source = finetune.state_dict, f'--finetune {finetune.source}'
        factory['pretrained_cfg_overlay'] = dict(state_dict=pretrained, num_classes=finetune.source_classes or -1)
        args.pretrained = True
    elif args.pretrained_path:
        source = f'--pretrained-path {args.pretrained_path}'
        pretrained = read_weights(args.pretrained_path, '--pretrained-path')
        factory['pretrained_cfg_overlay'] = dict(state_dict=pretrained, num_classes=-1)
    in_chans = args.in_chans or (args.input_size[0] if args.input_size else 3)
    given = flags_in_use(args, MODEL_FLAGS)
    with setup_step(f'cannot build --model {name}' + (f' with {given}' if given else ''),
                    'check the model\'s arguments (timm.create_model) and these flags'):
        # timm.create_model drops the None ones, so a model that does not take e.g. bn_eps still builds
        model = timm.create_model(
            name, pretrained=args.pretrained, in_chans=in_chans, num_classes=args.num_classes,
            drop_rate=args.drop, drop_path_rate=args.drop_path, drop_block_rate=args.drop_block,
            global_pool=args.gp, bn_momentum=args.bn_momentum, bn_eps=args.bn_eps, scriptable=args.torchscript,
            **factory, **kwargs)
    if pretrained is not None:
        for cfg in (getattr(model, 'pretrained_cfg', None), getattr(model, 'default_cfg', None)):
            if isinstance(cfg, dict):  # the weights themselves are not part of the model's config
                cfg.pop('state_dict', None)
        if args.pretrained:  # timm loads them non-strictly (head dropped): another architecture would load nothing
            check_weights_fit(model, pretrained, source)
    if args.initial_checkpoint:  # timm's load_checkpoint: the EMA weights when the checkpoint has them, strict
        load_initial_weights(model, args.initial_checkpoint)
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


MODEL_FLAGS = ('pretrained', 'pretrained_path', 'initial_checkpoint', 'model_kwargs', 'num_classes', 'in_chans',
               'input_size', 'gp', 'drop', 'drop_path', 'drop_block', 'bn_momentum', 'bn_eps', 'torchscript')


def flags_in_use(args, dests) -> str:
    """The flags among `dests` the user set (not at their defaults), as `--flag value` text: it names what a failed
    set-up step read, so its one-line error points at the input rather than at library internals."""
    from .train_args import build_parser
    defaults = vars(build_parser().parse_args([]))
    shown = []
    for dest in dests:
        value = getattr(args, dest, None)
        if value not in (None, False, '', [], {}) and value != defaults.get(dest):
            text = ' '.join(map(str, value)) if isinstance(value, (list, tuple)) else value
            shown.append(f"--{dest.replace('_', '-')}" + ('' if value is True else f' {text}'))
    return ', '.join(shown)


def read_weights(path: str, flag: str) -> dict:
    """Model weights from a checkpoint file (timm's choice: the EMA weights when it holds them), read as --resume
    reads (weights only, no code), finite; any problem is one UsageError naming `flag`."""
    try:
        checkpoint = read_checkpoint(path)
        state_dict, _ = select_state_dict(checkpoint, use_ema=isinstance(checkpoint, dict) and any(
            isinstance(checkpoint.get(k), dict) for k in ('state_dict_ema', 'model_ema')), path=path)
    except (ValueError, OSError) as e:
        raise UsageError(f'{flag}: {one_line(e)}') from None
    state_dict = clean_state_dict(state_dict)
    bad = first_non_finite(state_dict)
    if bad is not None:
        raise UsageError(f'{flag} {path}: weight {bad} is NaN or infinite; pass a checkpoint of a finite model')
    return state_dict


def check_weights_fit(model: nn.Module, state_dict: dict, source: str) -> None:
    """Weights handed to timm (`source`: '--pretrained-path FILE', '--finetune SOURCE'): every tensor of the model
    but its classifier there by name and shape, and nothing else; timm's head-adapting load is not strict, so
    another architecture would silently keep random weights (or load a larger sibling's first blocks)."""
    head = getattr(model, 'pretrained_cfg', {}).get('classifier') or ()
    head = (head,) if isinstance(head, str) else tuple(head)
    body = lambda key: not any(key == h or key.startswith(h + '.') for h in head)  # noqa: E731
    expected = {k: v for k, v in model.state_dict().items() if body(k)}
    missing = [k for k, v in expected.items() if k not in state_dict or tuple(state_dict[k].shape) != tuple(v.shape)]
    unexpected = [k for k in state_dict if body(k) and k not in expected]
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise UsageError(f'{source}: holds another architecture than {type(model).__name__} '
                         f'({len(missing)} of its {len(expected)} weights missing or of another shape, '
                         f'{len(unexpected)} unexpected, e.g. {first}); pass weights of --model, or the right --model')


def load_initial_weights(model: nn.Module, path: str) -> None:
    """--initial-checkpoint: the checkpoint's weights into `model`, every key and shape matching (timm's strict
    load); another architecture or class count is one UsageError saying which keys differ."""
    state_dict = read_weights(path, '--initial-checkpoint')
    try:
        load_state_dict_strict(model, state_dict, path)
    except ValueError as e:
        raise UsageError(f'--initial-checkpoint: {one_line(e)}') from None


def check_transforms(loaders) -> None:
    """One image through the training and the evaluation transforms (augmentation policy, interpolation, crop), so
    a transform that cannot run is bad input now, not an error in the first epoch. Every RNG is restored after, so
    `--stim none` still draws exactly timm's random numbers."""
    for name, loader in (('training', loaders.train), ('validation', loaders.eval)):
        dataset = getattr(loader, 'dataset', None)
        if dataset is None or isinstance(dataset, torch.utils.data.IterableDataset) \
                or not hasattr(dataset, '__len__') or len(dataset) == 0:
            continue
        # timm's scheduled resolutions: one transform per size, chosen by a (sample, transform) index
        transforms = getattr(dataset, 'transforms', None) if isinstance(dataset, ScheduledTransformDataset) else None
        indices = [(0, i) for i in range(len(transforms))] if transforms is not None else [0]
        with preserved_rng(), setup_step(f'the {name} transforms cannot process an image',
                                         'check --aa, --interpolation, --train-interpolation, --crop-pct, --scale, '
                                         '--ratio, --color-jitter and the other augmentation flags'):
            for index in indices:
                dataset[index]


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block that may draw random numbers (an augmentation, a loader's seed) without changing what the run
    draws afterwards: the torch (CPU), python and numpy generator states are put back."""
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])


def prepare_model(model: nn.Module, args, device, model_dtype=None) -> nn.Module:
    """timm's model conversions, in timm's order: split BN, device and dtype, channels-last, sync BN, TorchScript.

    --sync-bn uses timm's converter, which keeps the activation and drop of timm's fused BatchNormAct layers
    (torch's turns them into plain SyncBatchNorm and drops both).
    """
    if args.sync_bn and args.stim != 'none' and args.stim_per_rank:
        raise UsageError('--sync-bn with --stim-per-rank: every rank would run a different subnet, so their '
                         'SyncBatchNorm collectives would not match; drop one of the two')
    if args.split_bn:  # BatchNorm per augmentation split (plain training only, checked in train_args)
        model = convert_splitbn_model(model, max(args.aug_splits, 2))
    model.to(device=device, dtype=model_dtype)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.sync_bn and args.distributed:
        args.dist_bn = ''  # synchronized statistics need no averaging after the epoch
        model = convert_sync_batchnorm(model)
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
