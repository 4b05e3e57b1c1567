"""Measure network loafing: how well the residual subnetworks inside a trained model perform.

A residual network is an implicit ensemble of shallower subnetworks (docs/METHOD.md). "Loafing" is the gap
between what those subnetworks could do and what they do inside a normally trained network. This module
evaluates a set of depth vectors (subnets that keep a prefix of every stage) of one or more trained
models on a validation split, with optional per-subnet BatchNorm re-estimation, and reports top-1/top-5
against relative depth and counted relative FLOPs (timm_stim.flops). Models are loaded by
timm_stim.checkpoint, results summarised, plotted and written by timm_stim.loafing_report.

CLI (train_stim.py output folders, checkpoints, or `hf-hub:` / `local-dir:` models)::

    python -m timm_stim.loafing output/train/base output/train/st output/train/stpp \\
        --labels baseline st st++ --subnets all --space st --bn-recal 2000 --output output/loafing

Python::

    layout, specs = make_subnet_specs(find_residual_blocks(model), 'all', space='st')
    results = evaluate_subnets(model, layout, specs, val_loader, train_loader, bn_recal_images=2000)
    print(format_summary(summarize(results)))  # timm_stim.loafing_report
    plot_loafing(results, 'loafing.png')

Conventions: accuracies are percentages; `rel_flops` is the subnet's FLOPs over the full network's, as
counted by `torch.utils.flop_counter.FlopCounterMode` for one image at the evaluation size (it counts
convolutions, matmuls and attention; element-wise ops are not counted); `rel_depth` is residual blocks
run over all residual blocks (fixed, shape-changing blocks included in both). The full-depth entry is a
plain evaluation of the model. BN re-estimation always works on a deep copy of the model.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .blocks import BlockLayout, SubnetSpec, find_residual_blocks
from .skip import subnet
from .bn import recalibrate_bn
from .checkpoint import create_model_from_source, resolve_model_source
from .cli import (OneLineArgumentParser, UsageError, add_eval_data_args, add_model_source_args, check_cli_args,
                  check_output_folder, data_config_overrides, eval_data_args, input_step,
                  one_line, parse_model_kwargs, report_error)
from .data import create_eval_loader, is_digits, resolve_eval_data_config
from .flops import count_flops, count_relative_flops
from .loafing_report import format_summary, summarize, write_results
from .sampler import SubnetSampler, parse_space, split_flat_layout

__all__ = ['evaluate_subnets', 'loafing_eval', 'main', 'make_subnet_specs']

_CACHE_LIMIT_BYTES = 1 << 30


# ----------------------------------------------------------------------------------------------- subnet sets


def _depth_string(depths: Sequence[int]) -> str:
    return ','.join(str(int(d)) for d in depths)


def _keep_string(spec: SubnetSpec) -> str:
    return ''.join('1' if k else '0' for k in spec.keep)


def parse_depths(text: Union[str, Sequence[int]]) -> Tuple[int, ...]:
    if not isinstance(text, str):
        return tuple(int(d) for d in text)
    parts = [p for p in text.replace(' ', '').replace('-', ',').split(',') if p]
    if not parts or not all(p.isdigit() for p in parts):
        raise ValueError(f'invalid depth vector {text!r}: give one block count per stage, e.g. 3,4,6,3')
    return tuple(int(p) for p in parts)


def _support_size(sampler: SubnetSampler) -> int:
    if sampler.k_list is None:
        return 2 ** sampler.layout.num_skippable
    return math.prod(sampler.k_list)


def make_subnet_specs(
        layout: BlockLayout,
        subnets: str = 'all',
        space: str = 'st',
        depths: Optional[Sequence[Union[str, Sequence[int]]]] = None,
        seed: int = 0,
        pseudo_stages: int = 4,
) -> Tuple[BlockLayout, List[SubnetSpec]]:
    """The subnets to evaluate, full network first, and the layout their depth vectors refer to.

    Args:
        layout: residual-block layout of the model (`find_residual_blocks`).
        subnets: 'all' (the whole support of `space`) or 'random:N' (N distinct subnets of the space,
            drawn with `seed`; the full network is always one of them).
        space: 'st', 'st++', a K-list such as '1,2,4,1', or 'bernoulli[:p]'.
        depths: explicit depth vectors (overrides `subnets`); the full network is added if missing,
            because the loafing summary compares subnets against it.
        seed: seed of the random draw.
        pseudo_stages: groups a flat (ViT) model's blocks are split into, as in training.

    Returns:
        The (pseudo-)staged layout that depth vectors are expressed in, and the list of specs.
    """
    staged = split_flat_layout(layout, pseudo_stages)
    sampler = SubnetSampler(staged, space, seed=seed)
    full = staged.full_spec()
    if depths:
        specs = [staged.spec_from_depths(parse_depths(d)) for d in depths]
    else:
        mode, _, count = str(subnets).strip().lower().partition(':')
        if mode == 'all' and not count:
            specs = sampler.support()
        elif mode == 'random' and count.isdigit() and int(count) >= 1:
            specs = _sample_distinct(sampler, int(count))
        else:
            raise ValueError(f"invalid --subnets {subnets!r}: use 'all' or 'random:N' (N >= 1), "
                             f"or give explicit --depths.")
    ordered = [full] + [s for s in specs if s != full]
    return staged, list(dict.fromkeys(ordered))


def _sample_distinct(sampler: SubnetSampler, count: int) -> List[SubnetSpec]:
    """`count` distinct subnets, the full net first; rejection of repeats keeps the draw uniform."""
    count = min(count, _support_size(sampler))
    chosen = [sampler.layout.full_spec()]
    seen = set(chosen)
    while len(chosen) < count:
        spec = sampler.sample()
        if spec not in seen:
            seen.add(spec)
            chosen.append(spec)
    return chosen


# ------------------------------------------------------------------------------------------------ evaluation


def _split_batch(batch: Any) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def cache_batches(loader: Iterable, limit_bytes: int = _CACHE_LIMIT_BYTES) -> Union[List, Iterable]:
    """The loader's batches as a list when they fit in `limit_bytes` (eval transforms are deterministic,
    so every subnet sees the same tensors without re-decoding); otherwise the loader itself."""
    if isinstance(loader, list):
        return loader
    cached, total = [], 0
    for batch in loader:
        x, _ = _split_batch(batch)
        total += x.element_size() * x.numel()
        if total > limit_bytes:
            return loader
        cached.append(batch)
    return cached


@torch.no_grad()
def _accuracy(model: nn.Module, batches: Iterable, device: torch.device) -> Tuple[float, float, int]:
    """Top-1 and top-5 accuracy (%) of `model` in eval mode, and the number of samples."""
    correct1 = correct5 = total = 0
    for batch in batches:
        x, target = _split_batch(batch)
        x, target = x.to(device), target.to(device)
        logits = model(x)
        num_classes = logits.shape[-1]
        if int(target.max()) >= num_classes:
            raise ValueError(f'label {int(target.max())} does not fit a {num_classes}-class model: the dataset has '
                             f'more classes than the model; check the data flags and --num-classes.')
        topk = logits.topk(min(5, num_classes), dim=-1).indices
        hits = topk.eq(target.view(-1, 1))
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=-1).sum())
        total += target.numel()
    if total == 0:
        raise ValueError('the validation loader yielded no samples')
    return 100.0 * correct1 / total, 100.0 * correct5 / total, total


def _subnet_accuracy(
        model: nn.Module, layout: BlockLayout, spec: SubnetSpec, batches: Iterable, device: torch.device,
) -> Tuple[float, float, int]:
    was_training = model.training
    try:
        model.eval()
        with subnet(model, layout, spec):
            return _accuracy(model, batches, device)
    finally:
        model.train(was_training)


def _recalibrated_accuracy(
        model: nn.Module, layout: BlockLayout, spec: SubnetSpec, val_batches: Iterable, train_batches: Iterable,
        num_images: int, device: torch.device,
) -> Tuple[float, float, int]:
    """Accuracy after re-estimating BN statistics for this subnet, on a deep copy (the model is untouched)."""
    evaluated = copy.deepcopy(model)
    used = recalibrate_bn(evaluated, train_batches, num_images=num_images, layout=layout, spec=spec, device=device)
    top1, top5, _ = _subnet_accuracy(evaluated, layout, spec, val_batches, device)
    del evaluated
    return top1, top5, used


def evaluate_subnets(
        model: nn.Module,
        layout: BlockLayout,
        specs: Sequence[SubnetSpec],
        val_loader: Iterable,
        train_loader: Optional[Iterable] = None,
        bn_recal_images: int = 0,
        device: Optional[Union[str, torch.device]] = None,
        input_size: Optional[Sequence[int]] = None,
        label: str = 'model',
        progress: Optional[Callable[[], None]] = None,
) -> List[Dict[str, Any]]:
    """Top-1 / top-5 of every subnet in `specs`, with relative depth and counted relative FLOPs.

    Args:
        model: trained model (unwrapped: no DDP / compile wrapper); its state is never changed.
        layout: layout the specs refer to (from `make_subnet_specs`; pseudo-stages for flat models).
        specs: subnets to evaluate; the full network is evaluated plainly.
        val_loader: yields (input, target) batches with eval transforms.
        train_loader: training images (eval transforms) for BN re-estimation; needed if `bn_recal_images`.
        bn_recal_images: if > 0, also evaluate each subnet after re-estimating BN statistics for it on this
            many training images ('top1_bnrecal' / 'top5_bnrecal'), on a deep copy of the model.
        device: where to run; defaults to the model's device.
        input_size: (C, H, W) for FLOP counting; defaults to the shape of the first validation batch.
        label: model name written into every result row.
        progress: called once per evaluated subnet.

    Returns:
        One dict per spec with the keys of `RESULT_FIELDS` (bn-recal keys None when not run).
    """
    if bn_recal_images > 0 and train_loader is None:
        raise ValueError('bn_recal_images > 0 needs a train_loader of training images')
    device = torch.device(device) if device is not None else next(model.parameters()).device
    val_batches = cache_batches(val_loader)
    train_batches = cache_batches(train_loader) if bn_recal_images > 0 else None
    if input_size is None:
        input_size = tuple(_split_batch(next(iter(val_batches)))[0].shape[1:])
    full = layout.full_spec()
    rows = []
    for spec in specs:
        blocks_run = sum(spec.keep)
        top1, top5, num_val = _subnet_accuracy(model, layout, spec, val_batches, device)
        row = dict(
            model=label,
            depths=_depth_string(layout.depths(spec)),
            keep=_keep_string(spec),
            is_full=spec == full,
            blocks_run=blocks_run,
            num_blocks=len(spec.keep),
            rel_depth=blocks_run / len(spec.keep),
            flops=count_flops(model, layout, spec, input_size),
            rel_flops=count_relative_flops(model, layout, spec, input_size),
            top1=top1, top5=top5, top1_bnrecal=None, top5_bnrecal=None, bn_recal_images=0, num_val=num_val,
        )
        if bn_recal_images > 0:
            top1_r, top5_r, used = _recalibrated_accuracy(
                model, layout, spec, val_batches, train_batches, bn_recal_images, device)
            row.update(top1_bnrecal=top1_r, top5_bnrecal=top5_r, bn_recal_images=used)
        rows.append(row)
        if progress is not None:
            progress()
    return rows


def loafing_eval(
        model: nn.Module,
        val_loader: Iterable,
        subnets: str = 'random:8',
        space: str = 'st',
        train_loader: Optional[Iterable] = None,
        bn_recal_images: int = 0,
        output_dir: Optional[Union[str, Path]] = None,
        label: str = 'model',
        seed: int = 0,
        input_size: Optional[Sequence[int]] = None,
        device: Optional[Union[str, torch.device]] = None,
) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """One-call loafing evaluation of one model (for training scripts): find blocks, pick subnets, evaluate,
    and write loafing.csv/.json/.png into `output_dir` if given. Returns (results, summary).

    `subnets`/`space`/`seed` as in `make_subnet_specs`; the other arguments as in `evaluate_subnets`.
    Pass the plain model (not DDP- or compile-wrapped); its weights, BN statistics and mode are not changed.
    """
    val_batches = cache_batches(val_loader)
    if input_size is None:
        input_size = tuple(_split_batch(next(iter(val_batches)))[0].shape[1:])
    layout = find_residual_blocks(model, input_size=input_size)
    staged, specs = make_subnet_specs(layout, subnets, space=space, seed=seed)
    results = evaluate_subnets(model, staged, specs, val_batches, train_loader, bn_recal_images, device=device,
                               input_size=input_size, label=label)
    summary = summarize(results)
    if output_dir is not None:
        write_results(results, output_dir, summary, meta=dict(subnets=subnets, space=space, seed=seed,
                                                              input_size=list(input_size)))
    return results, summary


# -------------------------------------------------------------------------------------------------------- CLI


def _build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog='python -m timm_stim.loafing',
        description='Measure network loafing: accuracy of the residual subnetworks of trained models, '
                    'with relative depth and counted relative FLOPs.')
    parser.add_argument('sources', nargs='+', metavar='MODEL',
                        help='train_stim.py output folder, checkpoint file, export folder, hf-hub:... or local-dir:...')
    parser.add_argument('--labels', nargs='+', default=None, help='one label per model (default: folder/file names)')
    add_model_source_args(parser)
    add_eval_data_args(parser, batch_size=128, workers=2)
    group = parser.add_argument_group('subnets')
    group.add_argument('--subnets', default='all', help="'all' (the space's full support) or 'random:N'")
    group.add_argument('--space', default='st', help="'st' (uniform depth), 'st++', or a K-list like 1,2,4,1")
    group.add_argument('--depths', nargs='+', default=None, metavar='D1,D2,..',
                       help='explicit depth vectors, one block count per stage (per pseudo-stage for flat models), '
                            'e.g. 3,4,6,3 2,2,3,2 (overrides --subnets; the full net is always added)')
    group.add_argument('--pseudo-stages', type=int, default=4, help='pseudo-stages of flat (ViT) models')
    group.add_argument('--seed', type=int, default=0, help='seed of random:N and of data subsets')
    group.add_argument('--bn-recal', type=int, default=0, metavar='N',
                       help='also evaluate every subnet after re-estimating its BN statistics on N training images')
    group = parser.add_argument_group('output')
    group.add_argument('--output', default='output/loafing', help='folder for loafing.csv/.json/.png')
    group.add_argument('--title', default=None, help='plot title')
    group.add_argument('--device', default=None, help='default: cuda if available, else cpu')
    return parser


class _Progress:
    """tqdm bar, or a plain counter line, on stderr only when it is a terminal."""

    def __init__(self, total: int):
        self.enabled = sys.stderr.isatty()
        self.total, self.count, self.bar, self.desc = total, 0, None, 'subnets'
        if self.enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc='subnets', unit='subnet', file=sys.stderr)
            except ImportError:
                pass

    def set_description(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text)
        self.desc = text

    def __call__(self) -> None:
        self.count += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled:
            sys.stderr.write(f'\r{self.desc}: {self.count}/{self.total}')
            sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            sys.stderr.write('\n')


def _labels(args: argparse.Namespace, defaults: List[str]) -> List[str]:
    if args.labels is not None and len(args.labels) != len(defaults):
        raise ValueError(f'--labels gives {len(args.labels)} labels for {len(defaults)} models; give one per model')
    labels = list(args.labels) if args.labels else list(defaults)
    seen: Dict[str, int] = {}
    for i, label in enumerate(labels):  # keep labels unique so summary rows don't merge
        if label in seen:
            seen[label] += 1
            labels[i] = f'{label}#{seen[label]}'
        else:
            seen[label] = 1
    return labels


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """The CLI's work: load models, build loaders, evaluate, write files; returns results and summary."""
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    model_kwargs = parse_model_kwargs(args.model_kwargs)
    sources = [resolve_model_source(s, args.model, args.num_classes, model_kwargs, args.checkpoint, args.use_ema)
               for s in args.sources]
    labels = _labels(args, [s.label for s in sources])
    with input_step('cannot build the models', 'check the model sources, --model, --num-classes and --model-kwargs'):
        loaded = [create_model_from_source(s, device=device) for s in sources]
    infos = [resolved.info() for _, resolved in loaded]
    data = eval_data_args(args, infos[0]['train_args'])
    digits = is_digits(data['dataset'], data['data_dir'])
    data_config = resolve_eval_data_config(loaded[0][0], data_config_overrides(args), infos[0]['data_config'], digits)
    input_size = tuple(data_config['input_size'])
    plans, notes = [], []
    for (model, _), label in zip(loaded, labels):  # the subnets, checked against each model before any data work
        with input_step(f'cannot find the subnets of {label}', 'check --depths, --space, --subnets, --pseudo-stages'):
            layout = find_residual_blocks(model, input_size=input_size)
            staged, specs = make_subnet_specs(layout, args.subnets, args.space, args.depths, args.seed,
                                              args.pseudo_stages)
        plans.append((model, label, staged, specs))
        notes.append(f'{label}: {layout}; {len(specs)} subnets ({args.space} space)')
    val_loader = create_eval_loader(data['dataset'], data['data_dir'], data['val_split'], data_config,
                                    args.batch_size, args.workers, args.val_num_samples, args.seed, device)
    train_loader = None
    if args.bn_recal > 0:
        train_loader = create_eval_loader(data['dataset'], data['data_dir'], data['train_split'], data_config,
                                          args.batch_size, args.workers, args.bn_recal, args.seed, device)
        train_loader = cache_batches(train_loader)
    val_batches = cache_batches(val_loader)
    # Every input is checked (models, subnets, data): only now the info lines, so a bad input stays one line.
    for label, info in zip(labels[1:], infos[1:]):
        other = info['data_config'].get('input_size')
        if other and tuple(other) != tuple(data_config['input_size']):
            print(f'warning: {label} was trained at input size {tuple(other)}, evaluating all models at '
                  f'{tuple(data_config["input_size"])}', file=sys.stderr)
    print(f"data: {data['dataset'] or ('digits' if digits else 'folder')} {data['data_dir'] or ''} "
          f"split={data['val_split']} input_size={tuple(data_config['input_size'])} "
          f"mean={tuple(round(m, 4) for m in data_config['mean'])} crop_pct={data_config['crop_pct']}", file=sys.stderr)
    print('\n'.join(notes), file=sys.stderr)

    progress = _Progress(sum(len(p[3]) for p in plans))
    results: List[Dict[str, Any]] = []
    start = time.time()
    try:
        for model, label, staged, specs in plans:
            progress.set_description(label)
            results += evaluate_subnets(model, staged, specs, val_batches, train_loader, args.bn_recal, device,
                                        input_size, label, progress)
    finally:
        progress.close()
    summary = summarize(results)
    meta = dict(
        sources=args.sources, labels=labels, subnets=args.subnets if not args.depths else 'explicit',
        space=args.space, depths=args.depths, seed=args.seed, bn_recal=args.bn_recal, data=data,
        data_config=data_config, val_num_samples=args.val_num_samples, seconds=round(time.time() - start, 1),
        models=[{k: v for k, v in info.items() if k != 'train_args'} for info in infos],
    )
    files = write_results(results, args.output, summary, meta, title=args.title)
    return dict(results=results, summary=summary, files=files)


def check_args(args: argparse.Namespace) -> None:
    """The command line's values and the output folder, before any model is loaded (UsageError: exit 2)."""
    check_cli_args(args, positive=('pseudo_stages',), non_negative=('bn_recal',))
    parse_model_kwargs(args.model_kwargs)
    for text in args.depths or []:
        parse_depths(text)
    mode, _, count = str(args.subnets).strip().lower().partition(':')  # before run() prints its progress lines
    if not (args.depths or (mode == 'all' and not count) or (mode == 'random' and count.isdigit() and int(count))):
        raise UsageError(f"invalid --subnets {args.subnets!r}: use 'all' or 'random:N' (N >= 1), or give --depths")
    try:
        parse_space(args.space)
    except ValueError as e:
        raise UsageError(f'--space: {one_line(e)}') from None
    check_output_folder(args.output)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit codes: 0 done, 2 bad input (nothing written: files are written at the end only), 1 a failure."""
    try:
        args = _build_parser().parse_args(argv)
        check_args(args)
        out = run(args)  # loads and checks every model and the data first; writes files only at the end
    except (UsageError, ValueError, FileNotFoundError) as e:
        return report_error(e, 2)
    except (OSError, RuntimeError) as e:
        return report_error(e, 1)
    print(format_summary(out['summary']))
    print('\nwrote ' + ', '.join(str(p) for p in out['files'].values()))
    return 0


if __name__ == '__main__':
    sys.exit(main())
