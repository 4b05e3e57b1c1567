""" Arguments of train_stim.py: timm's train.py flags plus the Stimulative Training and Hub flags.

Every flag of timm's train.py is here with timm's name, dest, default and meaning, in timm's groups and order,
so that a timm command line or a timm-written args.yaml runs unchanged; `--stim*`, `--hub*`, `--stop-epoch`,
`--loafing-eval` are timm_stim's. One function, `check_args`, checks every option's type and range before any
work; it is table-driven (`RULES`), so a new check is one row.

Flags that cannot run with subnetwork training are accepted and refused with one line when used with ST
(`ST_INCOMPATIBLE`); every flag runs with --stim none.
"""
import argparse
import difflib
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import yaml
from timm.utils import ParseKwargs

from .cli import (MAX_BATCH_SIZE, MAX_IMG_SIZE, MAX_SEED, MAX_WORKERS, MIN_IMG_SIZE, OneLineArgumentParser,
                  UsageError, check_device, check_git_revision, check_interpolation, check_model_kwargs,
                  check_output_folder, name_max, one_line, short_value)

__all__ = ['ArgsError', 'build_parser', 'load_config', 'parse_args', 'check_args', 'args_record', 'Rule', 'RULES',
           'RUNTIME_KEYS', 'ST_INCOMPATIBLE', 'MODEL_KWARG_FLAGS', 'aa_policy_error', 'model_kwarg_flag']

# Keys an args.yaml may hold that are not flags: set at run time by timm's or train_stim's set-up.
RUNTIME_KEYS = ('world_size', 'rank', 'distributed', 'prefetcher', 'config', 'device_id', 'digits_recipe')


class ArgsError(UsageError):
    """A bad flag, config key or value: train_stim.py prints `error: <message>` and exits with code 2."""


def build_parser() -> argparse.ArgumentParser:
    """All flags, in timm's train.py groups and order; the timm_stim groups follow."""
    p = OneLineArgumentParser(
        prog='train_stim.py',
        description='Train a timm model with Stimulative Training (ST / ST++), or plainly with --stim none.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog='Built-in data: with no --data-dir and --dataset "" or "digits", the scikit-learn digits are used '
               '(32 px, 10 classes) and, unless -c is given, defaults come from hparams/digits_resnet18.yaml '
               '(model, epochs, lr, batch size, augmentation); flags on the command line still win.')
    p.add_argument('-c', '--config', default='', metavar='FILE',
                   help="YAML of defaults (keys = dest names; timm's args.yaml works unchanged)")

    g = p.add_argument_group('Dataset parameters')
    p.add_argument('data', nargs='?', metavar='DIR', const=None, help='dataset root (deprecated: use --data-dir)')
    g.add_argument('--data-dir', metavar='DIR', help='dataset root; none = built-in digits')
    g.add_argument('--dataset', metavar='NAME', default='', help='timm dataset: folder if empty, torch/cifar100, '
                                                                   'hfds/..., wds/..., digits')
    g.add_argument('--train-split', metavar='NAME', default='train')
    g.add_argument('--val-split', metavar='NAME', default='validation', help="'' = no validation")
    g.add_argument('--train-num-samples', default=None, type=int, metavar='N',
                   help='iterable datasets: samples per epoch; map-style: train on a fixed random subset of N')
    g.add_argument('--val-num-samples', default=None, type=int, metavar='N', help='iterable datasets only')
    g.add_argument('--dataset-download', action='store_true', default=False,
                   help='allow torchvision datasets to download')
    g.add_argument('--class-map', default='', type=str, metavar='FILENAME', help='class to index mapping file')
    g.add_argument('--input-img-mode', default=None, type=str, help='PIL mode of loaded images (default: by in_chans)')
    g.add_argument('--input-key', default=None, type=str, help='image column / key of hf/wds/tfds datasets')
    g.add_argument('--target-key', default=None, type=str, help='label column / key of hf/wds/tfds datasets')
    g.add_argument('--dataset-trust-remote-code', action='store_true', default=False,
                   help='let Hugging Face datasets run their loading code')

    g = p.add_argument_group('Model parameters')
    g.add_argument('--model', default='resnet50', type=str, metavar='MODEL', help='timm model name')
    g.add_argument('--pretrained', action='store_true', default=False, help='start from pretrained weights')
    g.add_argument('--pretrained-path', default=None, type=str, help='pretrained weights file (head adapted)')
    g.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH', help='weights to start from')
    g.add_argument('--resume', default='', type=str, metavar='PATH',
                   help='resume model, optimizer, subnet samplers and RNGs from this checkpoint')
    g.add_argument('--no-resume-opt', action='store_true', default=False, help='do not resume the optimizer')
    g.add_argument('--num-classes', type=int, default=None, metavar='N', help="default: the model's (10 on digits)")
    g.add_argument('--gp', default=None, type=str, metavar='POOL', help='global pool: avg, max, avgmax, ...')
    g.add_argument('--img-size', type=int, default=None, metavar='N', help='train and eval image size')
    g.add_argument('--in-chans', type=int, default=None, metavar='N', help='input channels')
    g.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N', help='C H W, overrides --img-size')
    g.add_argument('--crop-pct', default=None, type=float, metavar='N', help='eval centre-crop fraction')
    g.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN')
    g.add_argument('--std', type=float, nargs='+', default=None, metavar='STD')
    g.add_argument('--interpolation', default='', type=str, metavar='NAME', help='eval resize interpolation')
    g.add_argument('-b', '--batch-size', type=int, default=128, metavar='N', help='per process')
    g.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N')
    g.add_argument('--channels-last', action='store_true', default=False)
    g.add_argument('--fuser', default='', type=str, help="jit fuser: 'te', 'old' or 'nvfuser'")
    g.add_argument('--grad-accum-steps', type=int, default=1, metavar='N', help='micro-batches per update')
    g.add_argument('--grad-checkpointing', action='store_true', default=False, help='activation checkpointing')
    g.add_argument('--fast-norm', default=False, action='store_true', help="timm's fast (low precision) norms")
    g.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, help='create_model kwargs: k=v ...')
    g.add_argument('--head-init-scale', default=None, type=float, help='multiply the classifier init by this')
    g.add_argument('--head-init-bias', default=None, type=float, help='initial classifier bias')
    g.add_argument('--torchcompile-mode', type=str, default=None, help='torch.compile mode, e.g. max-autotune')
    scripting = g.add_mutually_exclusive_group()
    scripting.add_argument('--torchscript', dest='torchscript', action='store_true', help='torch.jit.script')
    scripting.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                           help='torch.compile backend')

    g = p.add_argument_group('Device parameters')
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', type=str,
                   help="timm's default is cuda; here cpu when no GPU is visible")
    g.add_argument('--amp', action='store_true', default=False, help='mixed precision (autocast)')
    g.add_argument('--amp-dtype', default='float16', type=str, help='float16 or bfloat16')
    g.add_argument('--model-dtype', default=None, type=str, help='float32, float16 or bfloat16 weights (no AMP)')
    g.add_argument('--no-ddp-bb', action='store_true', default=False, help='DDP without broadcast_buffers')
    g.add_argument('--synchronize-step', action='store_true', default=False, help='sync the device every update')
    g.add_argument('--local_rank', default=0, type=int)
    g.add_argument('--device-modules', default=None, type=str, nargs='+', help='modules to import for a device')

    g = p.add_argument_group('Optimizer parameters')
    g.add_argument('--opt', default='sgd', type=str, metavar='OPTIMIZER', help='timm optimizer: sgd, adamw, ...')
    g.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON')
    g.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA')
    g.add_argument('--momentum', type=float, default=0.9, metavar='M')
    g.add_argument('--weight-decay', type=float, default=2e-5)
    g.add_argument('--clip-grad', type=float, default=None, metavar='NORM', help='gradient clipping threshold')
    g.add_argument('--clip-mode', type=str, default='norm', help='norm, value or agc')
    g.add_argument('--layer-decay', type=float, default=None, help='layer-wise lr decay')
    g.add_argument('--layer-decay-min-scale', type=float, default=0, help='lowest layer-decay lr scale')
    g.add_argument('--layer-decay-no-opt-scale', type=float, default=None,
                   help='freeze layers whose layer-decay scale falls below this')
    g.add_argument('--opt-kwargs', nargs='*', default={}, action=ParseKwargs, help='optimizer kwargs: k=v ...')

    g = p.add_argument_group('Learning rate schedule parameters')
    g.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER',
                   help='cosine, tanh, step, multistep, plateau, poly')
    g.add_argument('--sched-on-updates', action='store_true', default=False, help='step the schedule every update')
    g.add_argument('--lr', type=float, default=None, metavar='LR', help='default: --lr-base scaled to the batch')
    g.add_argument('--lr-base', type=float, default=0.1, metavar='LR', help='lr at a global batch of --lr-base-size')
    g.add_argument('--lr-base-size', type=int, default=256, metavar='DIV')
    g.add_argument('--lr-base-scale', type=str, default='', metavar='SCALE', help="linear or sqrt (default: by opt)")
    g.add_argument('--lr-noise', type=float, nargs='+', default=None, metavar='pct, pct',
                   help='lr noise on/off epoch fractions')
    g.add_argument('--lr-noise-pct', type=float, default=0.67, metavar='PERCENT')
    g.add_argument('--lr-noise-std', type=float, default=1.0, metavar='STDDEV')
    g.add_argument('--lr-cycle-mul', type=float, default=1.0, metavar='MULT')
    g.add_argument('--lr-cycle-decay', type=float, default=0.5, metavar='MULT')
    g.add_argument('--lr-cycle-limit', type=int, default=1, metavar='N')
    g.add_argument('--lr-k-decay', type=float, default=1.0, help='k of the cosine / poly k-decay')
    g.add_argument('--warmup-lr', type=float, default=1e-5, metavar='LR')
    g.add_argument('--min-lr', type=float, default=0, metavar='LR')
    g.add_argument('--epochs', type=int, default=300, metavar='N')
    g.add_argument('--epoch-repeats', type=float, default=0., metavar='N', help='iterable datasets: repeats/epoch')
    g.add_argument('--start-epoch', default=None, type=int, metavar='N', help='override the epoch to start at')
    g.add_argument('--stop-epoch', type=int, default=None, metavar='K',
                   help='timm_stim: end the run after epoch K of the full schedule (resume later)')
    g.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+', metavar='MILESTONES',
                   help='multistep: epochs to decay the lr at')
    g.add_argument('--decay-epochs', type=float, default=90, metavar='N', help='step: epochs between decays')
    g.add_argument('--warmup-epochs', type=int, default=5, metavar='N')
    g.add_argument('--warmup-prefix', action='store_true', default=False, help='warm-up added before the schedule')
    g.add_argument('--cooldown-epochs', type=int, default=0, metavar='N')
    g.add_argument('--patience-epochs', type=int, default=10, metavar='N', help='plateau patience')
    g.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE')

    g = p.add_argument_group('Augmentation and regularization parameters')
    g.add_argument('--no-aug', action='store_true', default=False, help='no training augmentation')
    g.add_argument('--train-crop-mode', type=str, default=None, help='random-resized-crop mode')
    g.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT', help='crop area range')
    g.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO',
                   help='crop aspect range')
    g.add_argument('--hflip', type=float, default=0.5)
    g.add_argument('--vflip', type=float, default=0.)
    g.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT')
    g.add_argument('--color-jitter-prob', type=float, default=None, metavar='PCT')
    g.add_argument('--grayscale-prob', type=float, default=None, metavar='PCT')
    g.add_argument('--gaussian-blur-prob', type=float, default=None, metavar='PCT')
    g.add_argument('--aa', type=str, default=None, metavar='NAME', help='auto-augment policy, e.g. rand-m9-mstd0.5')
    g.add_argument('--aug-repeats', type=float, default=0, help='repeated augmentation: copies of each image')
    g.add_argument('--aug-splits', type=int, default=0, help='AugMix splits (plain training only)')
    g.add_argument('--jsd-loss', action='store_true', default=False, help='JSD + CE loss (with --aug-splits)')
    g.add_argument('--bce-loss', action='store_true', default=False, help='binary cross-entropy loss')
    g.add_argument('--bce-sum', action='store_true', default=False, help='BCE summed over classes')
    g.add_argument('--bce-target-thresh', type=float, default=None, help='binarize BCE targets at this value')
    g.add_argument('--bce-pos-weight', type=float, default=None, help='BCE positive-sample weight')
    g.add_argument('--reprob', type=float, default=0., metavar='PCT', help='random-erase probability')
    g.add_argument('--remode', type=str, default='pixel', help='random-erase mode')
    g.add_argument('--recount', type=int, default=1, help='random-erase count')
    g.add_argument('--resplit', action='store_true', default=False, help='no random erase on the first aug split')
    g.add_argument('--mixup', type=float, default=0.0, help='mixup alpha')
    g.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha')
    g.add_argument('--cutmix-minmax', type=float, nargs='+', default=None, help='cutmix box ratio range')
    g.add_argument('--mixup-prob', type=float, default=1.0)
    g.add_argument('--mixup-switch-prob', type=float, default=0.5)
    g.add_argument('--mixup-mode', type=str, default='batch', help='batch, pair or elem')
    g.add_argument('--mixup-off-epoch', default=0, type=int, metavar='N', help='no mixup from this epoch (0: never)')
    g.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    g.add_argument('--train-interpolation', type=str, default='random')
    g.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='dropout')
    g.add_argument('--drop-connect', type=float, default=None, metavar='PCT', help='deprecated: --drop-path')
    g.add_argument('--drop-path', type=float, default=None, metavar='PCT', help='stochastic depth')
    g.add_argument('--drop-block', type=float, default=None, metavar='PCT', help='DropBlock rate')

    g = p.add_argument_group('Batch norm parameters')
    g.add_argument('--bn-momentum', type=float, default=None)
    g.add_argument('--bn-eps', type=float, default=None)
    g.add_argument('--sync-bn', action='store_true', help='SyncBatchNorm across ranks')
    g.add_argument('--dist-bn', type=str, default='reduce', help="BN stats across ranks: broadcast, reduce or ''")
    g.add_argument('--split-bn', action='store_true', help='BN per augmentation split (plain training only)')

    g = p.add_argument_group('Model exponential moving average parameters')
    g.add_argument('--model-ema', action='store_true', default=False, help='EMA of the weights; eval_* is the EMA')
    g.add_argument('--model-ema-force-cpu', action='store_true', default=False, help='EMA on the CPU, not evaluated')
    g.add_argument('--model-ema-decay', type=float, default=0.9998)
    g.add_argument('--model-ema-warmup', action='store_true', help='EMA decay warm-up')

    g = p.add_argument_group('Miscellaneous parameters')
    g.add_argument('--seed', type=int, default=42, metavar='S')
    g.add_argument('--worker-seeding', type=str, default='all', help="loader worker seeding: 'all' or 'part'")
    g.add_argument('--log-interval', type=int, default=50, metavar='N', help='updates between log lines')
    g.add_argument('--val-interval', type=int, default=1, metavar='N', help='epochs between evaluations')
    g.add_argument('--recovery-interval', type=int, default=0, metavar='N', help='recovery checkpoint every N updates')
    g.add_argument('--checkpoint-hist', type=int, default=10, metavar='N', help='checkpoints kept')
    g.add_argument('-j', '--workers', type=int, default=4, metavar='N', help='loader processes per rank')
    g.add_argument('--save-images', action='store_true', default=False, help='save the logged training batches')
    g.add_argument('--pin-mem', action='store_true', default=False)
    g.add_argument('--no-prefetcher', action='store_true', default=False, help="no timm prefetcher (normalise "
                                                                                "on the CPU)")
    g.add_argument('--output', default='', type=str, metavar='PATH', help='output root; ./output/train if empty')
    g.add_argument('--experiment', default='', type=str, metavar='NAME', help='run folder; date-model-size if empty')
    g.add_argument('--eval-metric', default='top1', type=str, metavar='EVAL_METRIC', help='top1, top5 or loss')
    g.add_argument('--tta', type=int, default=0, metavar='N', help='eval: average N consecutive outputs')
    g.add_argument('--use-multi-epochs-loader', action='store_true', default=False, help='keep loader workers alive')
    g.add_argument('--log-wandb', action='store_true', default=False, help='log to Weights & Biases')
    g.add_argument('--wandb-project', default=None, type=str)
    g.add_argument('--wandb-tags', default=[], type=str, nargs='+')
    g.add_argument('--wandb-resume-id', default='', type=str, metavar='ID')
    # timm's scheduled-resolution and NaFlex loaders (timm_stim/train_setup.create_loaders)
    g.add_argument('--train-img-sizes', type=int, nargs='+', default=None)
    g.add_argument('--train-batch-sizes', type=int, nargs='+', default=None)
    g.add_argument('--train-size-probs', type=float, nargs='+', default=None)
    g.add_argument('--train-size-schedule', type=str, default='constant', choices=('constant', 'progressive'))
    g.add_argument('--train-size-schedule-spread', type=float, default=0.65)
    g.add_argument('--train-size-random-mix', type=float, default=0.1)
    g.add_argument('--train-batches-per-epoch', '--train-steps-per-epoch', type=int, default=None)
    g.add_argument('--variable-batch-loss-scale', default='none', type=str, choices=('none', 'sqrt', 'linear'))
    g.add_argument('--naflex-loader', action='store_true', default=False)
    g.add_argument('--naflex-train-seq-lens', type=int, nargs='+', default=[128, 256, 576, 784, 1024])
    g.add_argument('--naflex-max-seq-len', type=int, default=576)
    g.add_argument('--naflex-patch-sizes', type=int, nargs='+', default=None)
    g.add_argument('--naflex-patch-size-probs', type=float, nargs='+', default=None)
    g.add_argument('--naflex-loss-scale', default='linear', type=str, choices=('none', 'sqrt', 'linear'))
    g.add_argument('--naflex-patchify-channels-first', action='store_true', default=False)
    p.add_argument('--kd-model-name', default=None, type=str)
    p.add_argument('--kd-distill-type', default='logit', type=str, choices=['logit', 'feature', 'token'])
    p.add_argument('--kd-loss-type', default='kl', type=str)
    p.add_argument('--distill-loss-weight', default=None, type=float)
    p.add_argument('--task-loss-weight', default=None, type=float)
    p.add_argument('--kd-temperature', default=4.0, type=float)
    p.add_argument('--kd-student-feature-dim', default=None, type=int)
    p.add_argument('--kd-teacher-feature-dim', default=None, type=int)
    p.add_argument('--kd-token-distill-type', default='soft', type=str, choices=['soft', 'hard'])

    g = p.add_argument_group("Stimulative Training (None = the --stim preset's value)")
    g.add_argument('--stim', default='st++', choices=['none', 'st', 'st++'], help='preset; none = plain training')
    g.add_argument('--stim-space', default=None, help='st, st++, bernoulli[:p] or a K-list such as 1,2,4,1')
    g.add_argument('--stim-loss', default=None, choices=['kl', 'kl-'], help='kl (ST) or kl- (ST++)')
    g.add_argument('--stim-weight', type=float, default=None, help='lambda per subnet (1)')
    g.add_argument('--stim-temperature', type=float, default=None, help='KL temperature (1)')
    g.add_argument('--stim-amplitude', type=float, default=None, help='A of the KL- standardization (1)')
    g.add_argument('--stim-main-logits', default=None, choices=['standardized', 'raw'],
                   help='logits of the main loss: standardized like KL- (the authors\' ST++) or raw (ST, timm)')
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
    g.add_argument('--stim-compile', default='full', choices=['full', 'subnets'],
                   help='with --torchcompile: compile the full-network pass only (subnets eager) or the subnet '
                        'passes too (one graph per subnet and size: give --stim-sizes; see StimulativeTask.compile)')
    g.add_argument('--stim-bn-recal', type=int, default=0, metavar='N',
                   help='re-estimate BN statistics on N training images before each validation (authors: 2000)')
    g.add_argument('--loafing-eval', type=int, default=0, metavar='N',
                   help='at the end, evaluate the full net and N random ST-space subnets (timm_stim.loafing); '
                        'results in <output>/loafing and, with --push-to-hub, in the model card')
    g.add_argument('--export-subnets', default=None, metavar='SPEC',
                   help='at the end, export subnets as smaller plain timm models into <output>/subnets: depth vectors '
                        '"1,1,1,1 2,2,2,2", "keep:MASK" or "pareto:N" (python -m timm_stim.export); with '
                        '--push-to-hub each goes to <hub-repo-id>-d<depths>')

    g = p.add_argument_group('Fine-tune a trained model with ST (timm_stim.finetune)')
    g.add_argument('--finetune', nargs='?', const='', default=None, metavar='SOURCE',
                   help='make a trained model elastic: a run folder, checkpoint, export folder, local-dir:PATH, '
                        'hf-hub:NAME or timm NAME.TAG (bare: --pretrained / --initial-checkpoint / '
                        '--pretrained-path); fills the fine-tune settings you leave open, measures the subnets '
                        'before and after, exports pareto:3')

    g = p.add_argument_group('Hugging Face Hub (token from HF_TOKEN or `hf auth login`)')
    g.add_argument('--push-to-hub', action='store_true', help='export a plain timm model at the end and push it')
    g.add_argument('--hub-repo-id', default=None, help='owner/name')
    g.add_argument('--hub-private', action='store_true')
    g.add_argument('--hub-revision', default=None, help='branch to push to')
    g.add_argument('--hub-weights', default='best', choices=['best', 'last', 'ema'])
    return p


_MAX_CONFIG_BYTES = 1 << 20  # a recipe or args.yaml is a few KB
_MAX_CONFIG_VALUES = 100_000  # values after YAML aliases are expanded (a 'billion laughs' file has 10**9)


def _read_config_text(path: str) -> str:
    """The config file as text: a regular file of at most 1 MiB of UTF-8 without NUL bytes, else ArgsError."""
    try:
        if os.path.exists(path) and not os.path.isdir(path) and not os.path.isfile(path):
            raise ArgsError(f'config {path} is not a regular file (a device or pipe?): pass a YAML file')
        with open(path, 'rb') as f:
            data = f.read(_MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ArgsError(f'cannot read config {path}: {e.strerror or e}') from None
    if len(data) > _MAX_CONFIG_BYTES:
        raise ArgsError(f'config {path} is larger than {_MAX_CONFIG_BYTES >> 20} MiB: not a YAML of flags')
    if b'\0' in data:
        raise ArgsError(f'config {path} is a binary file, not a YAML of flags')
    try:
        return data.decode('utf-8-sig')
    except UnicodeDecodeError as e:
        raise ArgsError(f'config {path} is not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x}): save it as '
                        f'UTF-8 YAML') from None


def _too_many_values(cfg: Any) -> bool:
    """More than _MAX_CONFIG_VALUES values once aliases are expanded (what writing args.yaml would expand)."""
    stack, count = [cfg], 0
    while stack:
        item = stack.pop()
        count += 1
        if count > _MAX_CONFIG_VALUES:
            return True
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set)):
            stack.extend(item)
    return False


def load_config(path: str, parser: argparse.ArgumentParser) -> dict:
    """Read a YAML of parser defaults (a recipe or any args.yaml, timm's included).

    Unknown keys are errors (with a did-you-mean), not silently ignored; run-time keys timm and train_stim write
    (world_size, rank, ...) are skipped. Values are checked by `check_args` after parsing.
    """
    text = _read_config_text(path)
    try:
        cfg = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ArgsError(f'config {path} is not valid YAML: {one_line(e)[:300]}') from None
    except RecursionError:
        raise ArgsError(f'config {path} nests too deeply to be a YAML of flags') from None
    except (ValueError, TypeError, OverflowError) as e:  # e.g. a date that does not exist: 2021-02-30
        raise ArgsError(f'config {path} is not valid YAML: {type(e).__name__}: {one_line(e)[:200]}') from None
    if _too_many_values(cfg):
        raise ArgsError(f'config {path} expands to more than {_MAX_CONFIG_VALUES} values (YAML anchors and '
                        f'aliases?): not a YAML of flags')
    if not isinstance(cfg, dict):
        raise ArgsError(f'config {path} must map argument names to values')
    actions = {a.dest: a for a in parser._actions}
    for key, value in cfg.items():
        if key not in actions and key not in RUNTIME_KEYS:
            close = difflib.get_close_matches(str(key), list(actions), n=1)
            raise ArgsError(f'unknown key {key!r} in config {path}' + (f" (did you mean {close[0]!r}?)" if close else
                            "; keys are argument names with '_', e.g. batch_size"))
        choices = actions[key].choices if key in actions else None
        if choices and value not in choices and not (value is None and actions[key].default is None):
            raise ArgsError(f'{key}: {value!r} in config {path} is not one of {list(choices)}')
    return {k: v for k, v in cfg.items() if k not in RUNTIME_KEYS}


def parse_args(argv: Optional[Sequence[str]] = None, default_config: Optional[Callable] = None) -> argparse.Namespace:
    """timm's two-stage parse: -c/--config sets the defaults, the command line overrides them.

    `default_config(args)` may name a config to use when no -c is given (train_stim: the digits recipe on the
    built-in data); then `args.default_config` holds its path. `args.config_keys` lists the keys the config set.
    """
    config_parser = OneLineArgumentParser(prog='train_stim.py', add_help=False)
    config_parser.add_argument('-c', '--config', default='')
    known, remaining = config_parser.parse_known_args(argv)
    parser = build_parser()
    config = load_config(known.config, parser) if known.config else {}
    parser.set_defaults(**config)
    args = parser.parse_args(remaining)
    args.config, args.default_config = known.config, ''
    fallback = default_config(args) if default_config is not None and not known.config else None
    if fallback:
        config = load_config(fallback, parser)
        parser.set_defaults(**config)
        args = parser.parse_args(remaining)
        args.config, args.default_config = '', fallback
    args.config_keys = sorted(config)
    if args.data and not args.data_dir:  # timm: the positional data dir is a deprecated --data-dir
        args.data_dir = args.data
    return args


# ------------------------------------------------------------------------------------------------- checking

@dataclass(frozen=True)
class Rule:
    """One check: `ok(value)` must hold for each of `dests` (skipping None), when `applies(args)`.

    The message reads `--<flag> <need> (got <value>)`, so `need` says what is expected, e.g. 'must be >= 1'.
    With `uses_args`, `ok` is called as `ok(value, args)` (combinations with other flags); `need` may be a function
    `need(value, args)` for messages that name what the other flags allow. An `ok` that raises UsageError gives
    its own one-line message; one that raises anything else counts as a refusal (a value it cannot even read).
    `check_args` runs the single-flag rules first, then the `uses_args` ones, so a combination is only judged
    between values that are each in range.
    """
    dests: Tuple[str, ...]
    ok: Callable[..., bool]
    need: Union[str, Callable[[Any, argparse.Namespace], str]]
    applies: Callable[[argparse.Namespace], bool] = lambda args: True
    uses_args: bool = False


def _stim_on(args) -> bool:
    return getattr(args, 'stim', 'none') != 'none'


def _in(*choices):
    return lambda v: v in choices


_MIN_IMG_SIZE = MIN_IMG_SIZE
_MAX_EPOCHS = 1_000_000  # epochs and every epoch count: timm's longest recipes run 1,600 (MAE)
_MAX_SUBNETS = 256  # subnets per step: each is one more forward and backward pass; the authors' recipe uses 6
_MAX_CLASSES = 10_000_000  # classifier outputs: a 512-wide head is already 20 GB of weights at this size
_MAX_REPEATS = 100  # repeated-augmentation copies of each image (timm's recipes: 3)
_MAX_ERASE_COUNT = 100  # random-erase regions per image (timm's recipes: 1)
_positive = lambda v: v >= 1  # noqa: E731
_non_negative = lambda v: v >= 0  # noqa: E731
_probability = lambda v: 0.0 <= v <= 1.0  # noqa: E731
_fraction = lambda v: 0.0 < v <= 1.0  # noqa: E731
_above_zero = lambda v: v > 0  # noqa: E731


def _optimizer_info(name: str):
    """timm's registry entry of an --opt name, or None for an unknown one: timm's optimizer factory reads the part
    after the last '_' ('lookahead_adamw' -> adamw)."""
    from timm.optim import get_optimizer_info
    try:
        return get_optimizer_info(str(name).lower().split('_')[-1])
    except (ValueError, KeyError):
        return None


def _opt_info(args):
    return _optimizer_info(args.opt)


def _num_betas(args) -> Optional[int]:
    """How many --opt-betas the optimizer takes (timm's OptimInfo); None when it takes none (timm then drops the
    flag, as it drops --momentum for Adam)."""
    info = _opt_info(args)
    return getattr(info, 'num_betas', 2) if info is not None and getattr(info, 'has_betas', False) else None


def _nesterov(args) -> bool:
    """--opt is a Nesterov-momentum optimizer (timm's sgd, nesterov, sgdw, nlars, ...): torch then needs a
    momentum > 0."""
    info = _opt_info(args)
    return bool(info is not None and getattr(info, 'has_momentum', False) and (info.defaults or {}).get('nesterov'))


def _eval_batch(args) -> int:
    return args.validation_batch_size or args.batch_size


def _max_seed() -> int:
    """numpy's seed limit, less the ranks: timm seeds each rank with seed + rank."""
    try:
        world = max(1, int(os.environ.get('WORLD_SIZE', '1')))
    except ValueError:
        world = 1
    return MAX_SEED - (world - 1)


def _scheduled_epochs(args) -> float:
    """Epochs timm's cycle schedulers (cosine, tanh, poly) run: epochs * (1 + mul + ... + mul**(limit - 1))."""
    epochs, mul, limit = args.epochs, args.lr_cycle_mul, args.lr_cycle_limit
    try:
        total = epochs * limit if mul == 1 else epochs * (mul ** limit - 1) / (mul - 1)
    except OverflowError:
        return math.inf
    return total + (args.warmup_epochs if args.warmup_prefix else 0) + args.cooldown_epochs


def _compile_backends(all_tags: bool = True) -> Sequence[str]:
    import torch._dynamo
    try:
        return list(torch._dynamo.list_backends(exclude_tags=())) if all_tags else list(torch._dynamo.list_backends())
    except TypeError:  # older torch: no exclude_tags
        return list(torch._dynamo.list_backends())


def _compile_modes() -> Optional[Sequence[str]]:
    try:
        from torch._inductor import list_mode_options
        return list(list_mode_options())
    except (ImportError, AttributeError, RuntimeError):
        return None


def _output_root(args) -> str:
    return args.output or os.path.join('.', 'output', 'train')


def _experiment_fits(name: str, args) -> bool:
    """The run-folder name fits the file system's NAME_MAX where --output is (checked before --output exists)."""
    return len(os.fsencode(name)) <= name_max(_output_root(args))


def _pil_mode(mode: str) -> bool:
    from PIL import Image, ImageMode
    modes = getattr(Image, 'MODES', None)
    if modes is not None:
        return mode in modes
    try:
        ImageMode.getmode(mode)
    except KeyError:
        return False
    return True


def _module_exists(name: str) -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


_AA_FORMS = ("use rand-m9-mstd0.5 (RandAugment: m, n, p, mstd, mmax, inc, t), augmix-m3-w3 (AugMix: m, w, d, a, b, "
             "mstd) or an AutoAugment policy v0, v0r, original, originalr, 3a (with mstd); sections are '-'-separated "
             "key+number")


def aa_policy_error(policy: str) -> Optional[str]:
    """Why timm's augmentation factory cannot use `policy` as given, or None.

    The policy goes through timm's own parser (timm.data.auto_augment: rand_augment_transform,
    augment_and_mix_transform or auto_augment_transform, chosen by prefix as timm's transforms_factory does). On
    top, a section timm would silently skip is refused: one without a number ('rand-m9-zz'), an empty one
    ('rand--m9'), one given twice (timm keeps one), an unknown RandAugment transform set ('tfoo' falls back to the
    default set) and a magnitude above the one timm clamps to ('rand-m30' runs as m10 unless mmax says otherwise).
    """
    import re
    from timm.data import auto_augment as taa
    if not isinstance(policy, str) or not policy.strip():
        return 'must name a policy'
    kind = 'rand' if policy.startswith('rand') else 'augmix' if policy.startswith('augmix') else 'auto'
    hparams = dict(translate_const=100, img_mean=(124, 116, 104))
    try:
        if kind == 'rand':
            taa.rand_augment_transform(policy, dict(hparams))
        elif kind == 'augmix':
            taa.augment_and_mix_transform(policy, dict(hparams, translate_pct=0.3))
        else:
            taa.auto_augment_transform(policy, dict(hparams))
    except Exception as e:  # noqa: BLE001: timm's parsers assert, or fail in int() / float()
        detail = one_line(e) or type(e).__name__
        return f'is not a policy timm can parse ({detail[:120]}); {_AA_FORMS}'
    values: Dict[str, str] = {}
    for section in policy.split('-')[1:]:
        if kind == 'rand' and section.startswith('t'):
            key, value = 't', section[1:]
            if taa.rand_augment_choices(value) is taa.rand_augment_choices(''):
                return (f"has transform set {section!r}, which timm does not know and would replace by its default "
                        f"set; use tweights, t3a or t3aw, or leave the section out")
        else:
            parts = re.split(r'(\d.*)', section)
            if not section:
                return "has an empty section ('--', or a '-' at either end), which timm would silently ignore"
            if len(parts) < 2:
                return (f"has section {section!r} without a number, which timm would silently ignore; "
                        f"{_AA_FORMS}")
            key, value = parts[0], parts[1]
        if key in values:
            return f"gives section {key!r} twice; timm would use only one of them: give it once"
        values[key] = value
    if kind in ('rand', 'augmix') and 'm' in values:
        bound = int(values['mmax']) if kind == 'rand' and 'mmax' in values else int(taa._LEVEL_DENOM)
        if int(values['m']) > bound:
            return (f'has magnitude m{values["m"]}, above {bound}, to which timm clamps it'
                    + ('; add mmax' + values['m'] + ' to allow it' if kind == 'rand' else ''))
    if kind == 'rand' and 'p' in values and not 0 <= float(values['p']) <= 1:
        return f'has probability p{values["p"]}: it must be in [0, 1]'
    return None


# create_model kwargs that timm's train.py (and train_stim) set from a flag: the same key in --model-kwargs is a
# duplicate keyword argument. For the model-creation step, `model_kwarg_flag` names the flag behind a kwarg.
MODEL_KWARG_FLAGS = {
    'pretrained': '--pretrained', 'in_chans': '--in-chans', 'num_classes': '--num-classes', 'drop_rate': '--drop',
    'drop_path_rate': '--drop-path', 'drop_block_rate': '--drop-block', 'global_pool': '--gp',
    'bn_momentum': '--bn-momentum', 'bn_eps': '--bn-eps', 'scriptable': '--torchscript',
    'checkpoint_path': '--initial-checkpoint', 'pretrained_cfg_overlay': '--pretrained-path',
}


def model_kwarg_flag(key: str) -> str:
    """The flag a timm.create_model kwarg comes from: '--drop' for drop_rate, else '--model-kwargs <key>=...'."""
    return MODEL_KWARG_FLAGS.get(key, f'--model-kwargs {key}=...')


def _model_kwargs_ok(kwargs: Dict[str, Any], args) -> bool:
    owned = dict(MODEL_KWARG_FLAGS)
    if not getattr(args, 'pretrained_path', None):  # timm passes pretrained_cfg_overlay only with --pretrained-path
        owned.pop('pretrained_cfg_overlay')
    check_model_kwargs(kwargs, owned)  # raises UsageError with its own message
    return True


_EPOCH_COUNTS = ('epochs', 'stop_epoch', 'start_epoch', 'warmup_epochs', 'cooldown_epochs', 'patience_epochs',
                 'mixup_off_epoch', 'stim_start_epoch', 'decay_epochs')
_SIZE_LISTS = ('stim_sizes', 'train_img_sizes')
_SCHED_CYCLES = ('cosine', 'tanh', 'poly')

RULES = [
    # counts and sizes: what can work at all ...
    Rule(('batch_size', 'epochs', 'grad_accum_steps', 'log_interval', 'val_interval', 'lr_base_size',
          'lr_cycle_limit'), _positive, 'must be >= 1'),
    Rule(('validation_batch_size', 'stop_epoch', 'in_chans', 'num_classes', 'checkpoint_hist',
          'kd_student_feature_dim', 'kd_teacher_feature_dim'), _positive, 'must be >= 1'),
    Rule(('input_size',), lambda v: all(n >= 1 for n in v) and v[0] <= 4 and min(v[1:]) >= _MIN_IMG_SIZE,
         f'must be C H W with 1 to 4 channels and H, W >= {_MIN_IMG_SIZE}'),
    Rule(('img_size',), lambda v: v >= _MIN_IMG_SIZE, f'must be >= {_MIN_IMG_SIZE}'),
    # ... and generous upper bounds, past which a value can only be a typo
    Rule(('batch_size', 'validation_batch_size'), lambda v: v <= MAX_BATCH_SIZE,
         f'must be <= {MAX_BATCH_SIZE} per process'),
    Rule(('workers',), lambda v: v <= MAX_WORKERS, f'must be <= {MAX_WORKERS} loader processes per rank'),
    Rule(_EPOCH_COUNTS, lambda v: v <= _MAX_EPOCHS, f'must be <= {_MAX_EPOCHS} epochs'),
    Rule(('decay_milestones',), lambda v: all(m <= _MAX_EPOCHS for m in v), f'must be <= {_MAX_EPOCHS} epochs'),
    Rule(('img_size',), lambda v: v <= MAX_IMG_SIZE, f'must be <= {MAX_IMG_SIZE} px'),
    Rule(('input_size',), lambda v: max(v[1:]) <= MAX_IMG_SIZE, f'must have H, W <= {MAX_IMG_SIZE} px'),
    Rule(('num_classes',), lambda v: v <= _MAX_CLASSES, f'must be <= {_MAX_CLASSES} (ImageNet-21k has 21,843)'),
    Rule(('tta',), lambda v, args: v <= 1 or _eval_batch(args) % v == 0,
         lambda v, args: f'must divide the validation batch size {_eval_batch(args)}: each run of --tta consecutive '
                         f'outputs of a batch is averaged', uses_args=True),
    Rule(('aug_repeats',), lambda v: v <= _MAX_REPEATS, f'must be <= {_MAX_REPEATS} copies of each image'),
    Rule(('recount',), lambda v: v <= _MAX_ERASE_COUNT, f'must be <= {_MAX_ERASE_COUNT} regions per image'),
    Rule(('lr_cycle_limit',), lambda v, args: _scheduled_epochs(args) <= _MAX_EPOCHS,
         lambda v, args: f'with --epochs {args.epochs} and --lr-cycle-mul {args.lr_cycle_mul} schedules '
                         f'{_scheduled_epochs(args):.3g} epochs; at most {_MAX_EPOCHS} can run',
         lambda args: args.sched in _SCHED_CYCLES and args.lr_cycle_mul > 0, uses_args=True),
    Rule(('seed',), lambda v: 0 <= v <= _max_seed(),
         lambda v, args: f'must be in [0, {_max_seed()}] (numpy seeds with seed + rank, at most 2**32-1)'),
    Rule(('local_rank',), _non_negative, 'must be >= 0'),
    Rule(('std',), lambda v: all(x > 0 for x in v), 'must be > 0'),
    # optimizer
    Rule(('opt',), lambda v: _optimizer_info(v) is not None, "must be a timm optimizer (timm.optim.list_optimizers(); "
                                                   "'lookahead_' prefix allowed)"),
    Rule(('opt_eps',), _above_zero, 'must be > 0'),
    Rule(('opt_betas',), lambda v: 1 <= len(v) <= 3 and all(0 <= b < 1 for b in v),
         'must be 1 to 3 values, each in [0, 1)'),
    Rule(('opt_betas',), lambda v, args: len(v) == _num_betas(args),
         lambda v, args: f'needs {_num_betas(args)} values for --opt {args.opt}',
         lambda args: _num_betas(args) is not None, uses_args=True),
    Rule(('momentum',), lambda v: 0 <= v < 1, 'must be in [0, 1) (at 1 no gradient would ever be forgotten)'),
    Rule(('momentum',), _above_zero, lambda v, args: f'must be > 0: --opt {args.opt} uses Nesterov momentum',
         _nesterov),
    Rule(('layer_decay_no_opt_scale',), _probability, 'must be in [0, 1] (layer lr scales are in (0, 1])'),
    # learning-rate schedule
    Rule(('min_lr',), lambda v, args: v <= args.lr, lambda v, args: f'must be <= --lr {args.lr}: the schedule '
         f'decays from --lr down to --min-lr', lambda args: getattr(args, 'lr', None) is not None, uses_args=True),
    Rule(('lr_noise',), lambda v: len(v) in (1, 2) and all(0 <= n <= 1 for n in v) and (len(v) == 1 or v[0] < v[1]),
         'must be 1 or 2 fractions of the schedule in [0, 1]: noise on [and off], on < off'),
    Rule(('lr_noise_pct',), _fraction, 'must be in (0, 1] (a larger limit could make the lr negative)'),
    Rule(('lr_noise_std', 'lr_cycle_mul', 'lr_k_decay', 'decay_epochs'), _above_zero, 'must be > 0'),
    Rule(('lr_cycle_decay',), _probability, 'must be in [0, 1] (lr factor per cycle)'),
    # (> 1 is left to the user with step / multistep: timm then grows the lr, which the divergence tests use)
    Rule(('decay_rate',), _above_zero, 'must be > 0'),
    Rule(('decay_rate',), lambda v: v < 1, 'must be < 1 with --sched plateau (torch: factor < 1)',
         lambda args: args.sched == 'plateau'),
    # run names and files
    Rule(('experiment',), lambda v: _single_path_component(v),
         "must be one folder name inside --output (no '/', '..' or absolute path)"),
    Rule(('experiment',), _experiment_fits, lambda v, args: f'is {len(os.fsencode(v))} bytes, longer than the '
         f'{name_max(_output_root(args))} this file system allows for a folder name; choose a shorter --experiment',
         uses_args=True),
    Rule(('hub_revision',), lambda v: check_git_revision(v) is None, 'must be a branch name'),
    Rule(('device_modules',), lambda v: all(_module_exists(m) for m in v), 'must name importable Python modules'),
    # non-negative amounts and [0, 1] probabilities
    Rule(('workers', 'recovery_interval', 'warmup_epochs', 'cooldown_epochs', 'patience_epochs',
          'mixup_off_epoch', 'epoch_repeats', 'aug_repeats', 'recount', 'tta', 'start_epoch', 'stim_start_epoch',
          'stim_bn_recal', 'loafing_eval', 'train_num_samples', 'val_num_samples', 'mixup', 'cutmix',
          'weight_decay', 'warmup_lr', 'min_lr', 'lr', 'lr_base', 'clip_grad', 'smoothing', 'aug_splits',
          'color_jitter'), _non_negative, 'must be >= 0'),
    Rule(('hflip', 'vflip', 'reprob', 'mixup_prob', 'mixup_switch_prob', 'drop', 'drop_path', 'drop_block',
          'drop_connect', 'color_jitter_prob', 'grayscale_prob', 'gaussian_blur_prob', 'model_ema_decay',
          'layer_decay', 'layer_decay_min_scale', 'bn_momentum'), _probability, 'must be in [0, 1]'),
    Rule(('crop_pct',), _fraction, 'must be in (0, 1] (the eval centre crop as a fraction of the resized image)'),
    Rule(('clip_grad',), _above_zero, 'must be > 0 (0 would zero every gradient; leave it out for no clipping)'),
    Rule(('bn_eps',), _above_zero, 'must be > 0'),
    Rule(('recount',), _positive, 'must be >= 1 with --reprob > 0', lambda args: args.reprob > 0),
    Rule(('smoothing',), lambda v: v < 1.0, 'must be < 1'),
    Rule(('bce_target_thresh',), lambda v: 0 <= v < 1, 'must be in [0, 1) (targets are in [0, 1])'),
    Rule(('bce_pos_weight',), _above_zero, 'must be > 0'),
    # crops and augmentation
    Rule(('scale', 'ratio'), lambda v: len(v) == 2 and v[0] <= v[1], 'must be two numbers, low high'),
    Rule(('scale',), lambda v: v[0] > 0, 'must be > 0 (fractions of the image area)'),
    Rule(('ratio',), lambda v: v[0] > 0, 'must be > 0 (aspect ratios, width / height)'),
    Rule(('scale',), lambda v: v[1] <= 1, "must be <= 1 with the random-resized crop (--train-crop-mode rrc, the "
         "default): a crop larger than the image cannot be cut, and timm would silently fall back to the whole "
         "image; rkrc / rkrr take scales above 1", lambda args: (args.train_crop_mode or 'rrc') == 'rrc'),
    Rule(('cutmix_minmax',), lambda v: len(v) == 2 and 0 <= v[0] < v[1] <= 1,
         'must be two fractions of the image side, 0 <= min < max <= 1'),
    Rule(('interpolation',), lambda v: not v or check_interpolation(v, '--interpolation') is None, ''),
    Rule(('train_interpolation',),
         lambda v: not v or check_interpolation(v, '--train-interpolation', allow_random=True) is None, ''),
    Rule(('train_crop_mode',), _in('', 'rrc', 'rkrc', 'rkrr'),
         "must be 'rrc' (random-resized crop), 'rkrc' or 'rkrr' (random resize keeping the ratio, then a centre / "
         "random crop)"),
    Rule(('aa',), lambda v: aa_policy_error(v) is None, lambda v, args: aa_policy_error(v)),
    Rule(('input_img_mode',), _pil_mode, 'must be a PIL image mode such as RGB, L or RGBA'),
    # strings with a fixed vocabulary
    Rule(('fuser',), _in('', 'te', 'old', 'nvfuser'), "must be 'te', 'old', 'nvfuser' or '' (timm's set_jit_fuser)"),
    Rule(('torchcompile',), lambda v: v in _compile_backends(),
         lambda v, args: f"must be a torch.compile backend: {', '.join(_compile_backends(all_tags=False))}, or "
                         f"one of torch._dynamo.list_backends(exclude_tags=())",
         lambda args: not getattr(args, 'device_modules', None)),
    Rule(('torchcompile_mode',), lambda v: _compile_modes() is None or v in _compile_modes(),
         lambda v, args: f"must be a torch.compile mode: {', '.join(_compile_modes() or [])}",
         lambda args: getattr(args, 'torchcompile', None) in (None, 'inductor')),
    Rule(('lr_base_scale',), _in('', 'linear', 'sqrt'), "must be 'linear', 'sqrt' or '' (by optimizer)"),
    Rule(('clip_mode',), _in('norm', 'value', 'agc'), "must be 'norm', 'value' or 'agc'"),
    Rule(('dist_bn',), _in('', 'broadcast', 'reduce'), "must be 'broadcast', 'reduce' or ''"),
    Rule(('amp_dtype',), _in('float16', 'bfloat16'), "must be 'float16' or 'bfloat16'"),
    Rule(('model_dtype',), _in('float32', 'float16', 'bfloat16'), "must be 'float32', 'float16' or 'bfloat16'"),
    Rule(('eval_metric',), _in('top1', 'top5', 'loss'), "must be 'top1', 'top5' or 'loss'"),
    Rule(('mixup_mode',), _in('batch', 'pair', 'elem'), "must be 'batch', 'pair' or 'elem'"),
    Rule(('remode',), _in('const', 'rand', 'pixel'), "must be 'const', 'rand' or 'pixel'"),
    Rule(('worker_seeding',), _in('all', 'part'), "must be 'all' or 'part'"),
    Rule(('sched',), _in('cosine', 'tanh', 'step', 'multistep', 'plateau', 'poly', 'none'),
         "must be one of cosine, tanh, step, multistep, plateau, poly, none"),
    Rule(('sched_on_updates',), lambda v: not v, 'cannot be used with --sched plateau (timm steps a plateau schedule '
         'once per epoch, on the eval metric); choose another --sched, or a -c config without sched_on_updates '
         '(the built-in digits recipe sets it)', lambda args: getattr(args, 'sched', '') == 'plateau'),
    Rule(('decay_milestones',), lambda v: list(v) == sorted(v) and all(m >= 0 for m in v),
         'must be increasing epochs >= 0'),
    Rule(('model_kwargs',), _model_kwargs_ok, '', uses_args=True),
    # timm's scheduled-resolution and NaFlex loaders
    Rule(('train_img_sizes',), lambda v: all(n >= _MIN_IMG_SIZE for n in v), f'must all be >= {_MIN_IMG_SIZE}'),
    Rule(_SIZE_LISTS, lambda v: all(n <= MAX_IMG_SIZE for n in v), f'must all be <= {MAX_IMG_SIZE} px'),
    Rule(('train_batch_sizes', 'naflex_train_seq_lens', 'naflex_patch_sizes'), lambda v: all(n >= 1 for n in v),
         'must all be >= 1'),
    Rule(('train_batch_sizes',), lambda v: all(n <= MAX_BATCH_SIZE for n in v), f'must all be <= {MAX_BATCH_SIZE}'),
    Rule(('train_size_probs', 'naflex_patch_size_probs'), lambda v: all(p >= 0 for p in v) and sum(v) > 0,
         'must be weights >= 0 with a positive sum'),
    Rule(('train_batches_per_epoch', 'naflex_max_seq_len'), _positive, 'must be >= 1'),
    Rule(('train_size_random_mix',), _probability, 'must be in [0, 1]'),
    Rule(('train_size_schedule_spread', 'kd_temperature'), lambda v: v > 0, 'must be > 0'),
    Rule(('distill_loss_weight', 'task_loss_weight'), _non_negative, 'must be >= 0'),
    # Stimulative Training
    Rule(('stim_min_scale',), lambda v: 0.0 < v <= 1.0, 'must be in (0, 1]; 1 turns smaller subnet inputs off',
         _stim_on),
    Rule(('stim_subnets',), _positive, 'must be >= 1; --stim none trains plainly', _stim_on),
    Rule(('stim_subnets',), lambda v: v <= _MAX_SUBNETS,
         f'must be <= {_MAX_SUBNETS} subnets per step (each is one more forward and backward pass)', _stim_on),
    Rule(('stim_weight', 'stim_temperature', 'stim_amplitude'), lambda v: v > 0, 'must be > 0', _stim_on),
    Rule(('stim_sizes',), lambda v: all(n >= _MIN_IMG_SIZE for n in v), f'must all be >= {_MIN_IMG_SIZE}', _stim_on),
]

# Used with --stim st / st++, these are refused: each splits or replaces the batch or the loss in a way the
# subnetwork pass does not follow. With --stim none they run as in timm.
ST_INCOMPATIBLE = {
    'aug_splits': 'AugMix splits interleave several views in one batch, which the subnet passes would mix',
    'jsd_loss': 'the JSD loss needs --aug-splits',
    'split_bn': 'split BatchNorm needs --aug-splits',
    'resplit': 'it only applies to --aug-splits',
    'torchscript': 'a scripted model cannot skip blocks',
}


_FLAG_NAMES: Dict[str, str] = {}


def _flag(dest: str) -> str:
    """The flag as the user types it: the parser's long option for `dest` (--local_rank keeps its '_')."""
    if not _FLAG_NAMES:
        for action in build_parser()._actions:
            longs = [o for o in action.option_strings if o.startswith('--')]
            if longs:
                _FLAG_NAMES[action.dest] = longs[0]
    return _FLAG_NAMES.get(dest, '--' + dest.replace('_', '-'))


def _single_path_component(name: str) -> bool:
    """A run-folder name that stays inside --output: no separator, not '.' / '..', nothing absolute."""
    separators = [s for s in (os.sep, os.altsep, '/') if s]
    return not name or (name not in ('.', '..') and '\0' not in name and not any(s in name for s in separators))


def _non_finite(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """Float flags holding NaN or an infinity (argparse's float() accepts 'nan' and 'inf')."""
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if action.type is not float or value is None:
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                yield f'{_flag(action.dest)} must be a finite number (got {v})'
                break


def _check_device(args: argparse.Namespace) -> None:
    """--device names a device this machine has (cli.check_device), unless --device-modules registers one."""
    if not getattr(args, 'device_modules', None):
        check_device(args.device)


def _type_errors(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """Values a config gave with the wrong type or count (the command line is already checked by argparse)."""
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if action.dest in ('help', 'config') or value is None or value == action.default:
            continue
        kind = action.type or (bool if isinstance(action.const, bool) and action.nargs == 0 else None)
        many = action.nargs in ('+', '*') or (isinstance(action.nargs, int) and action.nargs > 0)
        if isinstance(action, ParseKwargs):
            if not isinstance(value, dict):
                yield f'{_flag(action.dest)} must be a mapping of key: value (got {value!r})'
            continue
        values = value if many and isinstance(value, (list, tuple)) else [value]
        if many and not isinstance(value, (list, tuple)):
            yield f'{_flag(action.dest)} must be a list (got {value!r})'
            continue
        if many and isinstance(action.nargs, int) and len(values) != action.nargs:
            yield f'{_flag(action.dest)} needs {action.nargs} values (got {value!r})'
        for v in values:
            good = {bool: lambda x: isinstance(x, bool), int: lambda x: isinstance(x, int) and not isinstance(x, bool),
                    float: lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
                    str: lambda x: isinstance(x, str)}.get(kind, lambda x: True)
            if not good(v):
                yield f'{_flag(action.dest)} must be {getattr(kind, "__name__", kind)} (got {v!r})'
                break
        if action.choices and any(v not in action.choices for v in values):
            yield f'{_flag(action.dest)}: {value!r} is not one of {list(action.choices)}'


def _rule_error(rule: Rule, args: argparse.Namespace) -> Optional[str]:
    """The one-line message of the first of `rule.dests` whose value breaks `rule`, or None."""
    try:
        if not rule.applies(args):
            return None
    except Exception:  # noqa: BLE001: a condition on another flag that is itself malformed (checked by its rule)
        return None
    for dest in rule.dests:
        value = getattr(args, dest, None)
        if value is None:
            continue
        try:
            good = rule.ok(value, args) if rule.uses_args else rule.ok(value)
        except UsageError as e:  # the check names the problem itself
            return str(e)
        except Exception:  # noqa: BLE001: a value of a shape the check cannot even read
            good = False
        if not good:
            try:
                need = rule.need(value, args) if callable(rule.need) else rule.need
            except Exception:  # noqa: BLE001
                need = 'is out of range'
            return f'{_flag(dest)} {need} (got {short_value(value)})'
    return None


def check_args(args: argparse.Namespace, rules: Sequence[Rule] = RULES) -> None:
    """Every option's type and range, and combinations that cannot work; raises ArgsError on the first problem.

    Runs before any work (no file read or written, no model built).
    """
    parser = build_parser()
    for message in _type_errors(args, parser):
        raise ArgsError(message + (f' in config {args.config}' if getattr(args, 'config', '') else ''))
    for message in _non_finite(args, parser):
        raise ArgsError(message)
    for rule in sorted(rules, key=lambda r: r.uses_args):  # each flag's own range before combinations of flags
        message = _rule_error(rule, args)
        if message:
            raise ArgsError(message)
    if _stim_on(args):
        for dest, why in ST_INCOMPATIBLE.items():
            if getattr(args, dest):
                raise ArgsError(f'{_flag(dest)} cannot be combined with --stim {args.stim}: {why}; use --stim none')
    _check_loader_modes(args)
    _check_distillation(args)
    if args.jsd_loss and args.aug_splits < 2:
        raise ArgsError('--jsd-loss needs --aug-splits 2 or more')
    if args.aug_splits == 1:
        raise ArgsError('--aug-splits must be 0 (off) or >= 2 (got 1)')
    if args.split_bn and args.aug_splits < 2 and not args.resplit:
        raise ArgsError('--split-bn needs --aug-splits 2 or more (or --resplit)')
    if args.amp and args.model_dtype not in (None, 'float32'):
        raise ArgsError(f'--amp needs float32 weights (got --model-dtype {args.model_dtype})')
    if args.torchscript and args.torchcompile:
        raise ArgsError('--torchscript and --torchcompile cannot be combined')
    if args.log_wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ArgsError('--log-wandb needs the wandb package: pip install wandb') from None
    for dest in ('resume', 'initial_checkpoint', 'pretrained_path'):
        path = getattr(args, dest)
        if path and os.path.isdir(path):
            raise ArgsError(f'{_flag(dest)} {path} is a folder; pass the checkpoint file inside it, '
                            f'e.g. {os.path.join(path, "last.pth.tar")}')
        if path and not os.path.isfile(path):
            raise ArgsError(f'{_flag(dest)} file {path} does not exist')
    if getattr(args, 'export_subnets', None):
        from .export import parse_subnets
        try:
            parse_subnets(args.export_subnets)
        except ValueError as e:
            raise ArgsError(f'--export-subnets: {e}') from None
    channels = args.input_size[0] if args.input_size else (args.in_chans or 3)
    for dest in ('mean', 'std'):
        value = getattr(args, dest)
        if value is not None and len(value) not in (1, channels):
            raise ArgsError(f'{_flag(dest)} needs 1 value or one per input channel ({channels}) (got {value})')
    _check_device(args)
    root = args.output or os.path.join('.', 'output', 'train')
    check_output_folder(os.path.join(root, args.experiment) if args.experiment else root)


def _check_loader_modes(args) -> None:
    """timm's scheduled-resolution and NaFlex loaders: list lengths agree, the two modes exclude each other."""
    sizes = args.train_img_sizes
    if args.naflex_loader and sizes is not None:
        raise ArgsError('--naflex-loader and --train-img-sizes are alternative loader modes: pass one of them')
    if args.naflex_loader and args.use_multi_epochs_loader:
        raise ArgsError('--use-multi-epochs-loader cannot be used with --naflex-loader: drop one of them')
    if args.naflex_loader and args.aug_splits:
        raise ArgsError('--aug-splits cannot be used with --naflex-loader (timm\'s NaFlex loader has no splits)')
    for dest, length_of in (('train_batch_sizes', 'train_img_sizes'), ('train_size_probs', 'train_img_sizes'),
                            ('naflex_patch_size_probs', 'naflex_patch_sizes')):
        values, reference = getattr(args, dest), getattr(args, length_of)
        if values is not None and (reference is None or len(values) != len(reference)):
            raise ArgsError(f'{_flag(dest)} needs one value per {_flag(length_of)} value '
                            f'(got {len(values)} for {len(reference or [])})')
    if args.naflex_loader and _stim_on(args):
        if args.stim_sizes or (args.stim_min_scale is not None and args.stim_min_scale < 1):
            raise ArgsError('smaller subnet inputs (--stim-min-scale < 1, --stim-sizes) need image tensors, but '
                            '--naflex-loader batches are patch sequences of varying length already: drop them')


def _check_distillation(args) -> None:
    """Knowledge distillation (timm's --kd-* flags): only the values timm's tasks accept."""
    if not args.kd_model_name:
        return
    if _stim_on(args) and args.kd_distill_type != 'logit':
        raise ArgsError(f'--kd-distill-type {args.kd_distill_type} cannot be combined with --stim {args.stim}: it '
                        f'changes what the model returns in training (pooled features, or two heads\' logits), '
                        f'which the subnet passes do not follow; use --kd-distill-type logit, or --stim none')
    if args.kd_loss_type != 'kl':
        raise ArgsError(f"--kd-loss-type must be 'kl', the one logit distillation loss (got {args.kd_loss_type})")
    if not args.kd_model_name.startswith(('hf-hub:', 'local-dir:')):
        from .checkpoint import check_model_name
        try:
            check_model_name(args.kd_model_name)
        except ValueError as e:
            raise ArgsError(f'--kd-model-name: {e}; or give hf-hub:owner/name or local-dir:/path/to/model_folder') \
                from None


def args_record(args: argparse.Namespace) -> Dict[str, Any]:
    """Argument values as plain YAML types, for args.yaml and checkpoints: every flag plus world_size.

    `lr` stays as given (None = scaled from --lr-base at run time), as in timm's args.yaml, so the file re-used
    at another batch size rescales (train_stim keeps the given value in args.lr_given, the resolved one in args.lr).
    """
    keys = [a.dest for a in build_parser()._actions if a.dest != 'help'] + ['world_size']
    plain = lambda v: [plain(x) for x in v] if isinstance(v, (list, tuple)) else v  # noqa: E731
    record = {k: plain(getattr(args, k)) for k in keys if hasattr(args, k)}
    if hasattr(args, 'lr_given'):
        record['lr'] = args.lr_given
    return record
