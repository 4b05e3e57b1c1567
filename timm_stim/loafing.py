"""Measure network loafing: how well the residual subnetworks inside a trained model perform.

A residual network is an implicit ensemble of shallower subnetworks (METHOD.md). "Loafing" is the gap
between what those subnetworks could do and what they do inside a normally trained network. This module
evaluates a set of depth vectors (subnets that keep a prefix of every stage) of one or more trained
models on a validation split, with optional per-subnet BatchNorm re-estimation, and reports top-1/top-5
against relative depth and counted relative FLOPs.

CLI (train_stim.py output folders, checkpoints, or `hf-hub:` / `local-dir:` models)::

    python -m timm_stim.loafing output/train/base output/train/st output/train/stpp \\
        --labels baseline st st++ --subnets all --space st --bn-recal 2000 --output output/loafing

Python::

    layout, specs = make_subnet_specs(find_residual_blocks(model), 'all', space='st')
    results = evaluate_subnets(model, layout, specs, val_loader, train_loader, bn_recal_images=2000)
    print(format_summary(summarize(results)))
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
import csv
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.utils.data
from torch.utils.flop_counter import FlopCounterMode

from .blocks import BlockLayout, SubnetSpec, find_residual_blocks, subnet
from .bn import recalibrate_bn
from .cli import report_error
from .hub import load_checkpoint_into, parse_model_kwargs, read_checkpoint
from .sampler import SubnetSampler

__all__ = [
    'RESULT_FIELDS', 'make_subnet_specs', 'count_flops', 'count_relative_flops', 'evaluate_subnets',
    'summarize', 'format_summary', 'loafing_markdown', 'plot_loafing', 'write_results', 'loafing_eval',
    'load_model_for_loafing', 'resolve_eval_data_config', 'create_eval_loader', 'main',
]

# Columns of loafing.csv, in order (loafing.json holds the same keys per result).
RESULT_FIELDS = (
    'model', 'depths', 'keep', 'is_full', 'blocks_run', 'num_blocks', 'rel_depth', 'flops', 'rel_flops',
    'top1', 'top5', 'top1_bnrecal', 'top5_bnrecal', 'bn_recal_images', 'num_val',
)
_DATA_KEYS = ('input_size', 'mean', 'std', 'crop_pct', 'crop_mode', 'interpolation')
_CHECKPOINT_NAMES = {'best': 'model_best.pth.tar', 'last': 'last.pth.tar'}
# timm train.py args that are timm.create_model kwargs (drop rates do not matter in eval mode).
_CREATE_ARGS = ('in_chans', 'global_pool', 'bn_momentum', 'bn_eps')
_CACHE_LIMIT_BYTES = 1 << 30
_FLOP_CACHE: Dict[tuple, int] = {}


# ----------------------------------------------------------------------------------------------- subnet sets


def _depth_string(depths: Sequence[int]) -> str:
    return ','.join(str(int(d)) for d in depths)


def _keep_string(spec: SubnetSpec) -> str:
    return ''.join('1' if k else '0' for k in spec.keep)


def _parse_depths(text: Union[str, Sequence[int]]) -> Tuple[int, ...]:
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
    sampler = SubnetSampler(layout, space, seed=seed, pseudo_stages=pseudo_stages)
    staged = sampler.layout
    full = staged.full_spec()
    if depths:
        specs = [staged.spec_from_depths(_parse_depths(d)) for d in depths]
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


# ----------------------------------------------------------------------------------------------------- FLOPs


def _param_device_dtype(model: nn.Module) -> Tuple[torch.device, torch.dtype]:
    param = next(model.parameters(), None)
    if param is None:
        return torch.device('cpu'), torch.float32
    return param.device, (param.dtype if param.is_floating_point() else torch.float32)


def _flop_key(model: nn.Module, layout: BlockLayout, spec: SubnetSpec, input_size: Sequence[int]) -> tuple:
    # FLOPs depend on the architecture and the input size, not on the weights: key on what defines them.
    n_params = sum(p.numel() for p in model.parameters())
    return (type(model).__qualname__, n_params, getattr(model, 'num_classes', None), layout.paths,
            spec.keep, tuple(int(s) for s in input_size))


@torch.no_grad()
def count_flops(model: nn.Module, layout: BlockLayout, spec: Optional[SubnetSpec], input_size: Sequence[int]) -> int:
    """FLOPs of one forward of the subnet `spec` on one image of `input_size` (C, H, W), counted.

    Cached per architecture, keep-mask and input size. The model runs once in eval mode (so BatchNorm
    running statistics are not touched) and its train/eval mode is restored.
    """
    spec = spec or layout.full_spec()
    key = _flop_key(model, layout, spec, input_size)
    if key in _FLOP_CACHE:
        return _FLOP_CACHE[key]
    device, dtype = _param_device_dtype(model)
    was_training = model.training
    try:
        model.eval()
        with subnet(model, layout, spec), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, *input_size, device=device, dtype=dtype))
    finally:
        model.train(was_training)
    _FLOP_CACHE[key] = int(counter.get_total_flops())
    return _FLOP_CACHE[key]


def count_relative_flops(model: nn.Module, layout: BlockLayout, spec: SubnetSpec, input_size: Sequence[int]) -> float:
    """FLOPs of subnet `spec` over the full network's, both counted on one image of `input_size`."""
    full = count_flops(model, layout, layout.full_spec(), input_size)
    return count_flops(model, layout, spec, input_size) / full if full else float('nan')


# ------------------------------------------------------------------------------------------------ evaluation


def _split_batch(batch: Any) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def _cache_batches(loader: Iterable, limit_bytes: int = _CACHE_LIMIT_BYTES) -> Union[List, Iterable]:
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
    device = torch.device(device) if device is not None else _param_device_dtype(model)[0]
    val_batches = _cache_batches(val_loader)
    train_batches = _cache_batches(train_loader) if bn_recal_images > 0 else None
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


# ---------------------------------------------------------------------------------------------------- summary


def _stats(values: List[float], prefix: str, suffix: str = '') -> Dict[str, Optional[float]]:
    return {
        f'{prefix}mean_top1{suffix}': statistics.fmean(values) if values else None,
        f'{prefix}min_top1{suffix}': min(values) if values else None,
        f'{prefix}median_top1{suffix}': statistics.median(values) if values else None,
        f'{prefix}max_top1{suffix}': max(values) if values else None,
    }


def _group_by_model(results: Sequence[Dict[str, Any]]) -> Dict[str, List[Dict[str, Any]]]:
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for row in results:
        groups.setdefault(row['model'], []).append(row)
    return groups


def _has_bnrecal(results: Sequence[Dict[str, Any]]) -> bool:
    return any(r.get('top1_bnrecal') is not None for r in results)


def summarize(results: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per model (in order of appearance): full-net top-1 and mean/min/median/max top-1 of its subnets
    (full net excluded), with and without BN re-estimation, and the gap of each to the first model."""
    recal = _has_bnrecal(results)
    summary = []
    for label, rows in _group_by_model(results).items():
        full = next((r for r in rows if r['is_full']), None)
        subs = [r for r in rows if not r['is_full']]
        entry: Dict[str, Any] = dict(
            model=label,
            num_subnets=len(subs),
            full_top1=full['top1'] if full else None,
            full_top5=full['top5'] if full else None,
            **_stats([r['top1'] for r in subs], ''),
            mean_rel_flops=statistics.fmean(r['rel_flops'] for r in subs) if subs else None,
        )
        if recal:
            entry['full_top1_bnrecal'] = full['top1_bnrecal'] if full else None
            entry.update(_stats([r['top1_bnrecal'] for r in subs if r['top1_bnrecal'] is not None], '', '_bnrecal'))
        summary.append(entry)
    if summary:
        first = summary[0]
        metrics = [k for k in first if k.endswith(('top1', 'top1_bnrecal')) and not k.startswith('max')]
        for entry in summary:
            for key in metrics:
                a, b = entry.get(key), first.get(key)
                entry[f'gap_{key}'] = a - b if a is not None and b is not None else None
    return summary


def _fmt(value: Any, signed: bool = False) -> str:
    if value is None:
        return '-'
    if isinstance(value, float):
        return f'{value:+.2f}' if signed else f'{value:.2f}'
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ['  '.join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append('  '.join('-' * w for w in widths))
    for row in rows:
        lines.append('  '.join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return '\n'.join(lines)


def format_summary(summary: Sequence[Dict[str, Any]]) -> str:
    """The summary as a plain-text table (top-1 %, subnets exclude the full net, gaps vs the first model)."""
    if not summary:
        return '(no results)'
    blocks = []
    variants = [('', 'BN statistics as trained')]
    if 'full_top1_bnrecal' in summary[0]:
        variants.append(('_bnrecal', 'BN statistics re-estimated per subnet'))
    first = summary[0]['model']
    for suffix, title in variants:
        header = ['model', 'subnets', 'full', 'mean sub', 'min sub', 'median sub',
                  'd full', 'd mean', 'd min', 'd median']
        rows = []
        for e in summary:
            keys = [f'full_top1{suffix}', f'mean_top1{suffix}', f'min_top1{suffix}', f'median_top1{suffix}']
            rows.append([e['model'], str(e['num_subnets'])] + [_fmt(e.get(k)) for k in keys]
                        + [_fmt(e.get(f'gap_{k}'), signed=True) for k in keys])
        blocks.append(f'top-1 (%), {title}; d = difference to {first!r}\n' + _table(header, rows))
    return '\n\n'.join(blocks)


def loafing_markdown(
        summary_rows: Sequence[Dict[str, Any]],
        plot_filename: Optional[str] = 'loafing.png',
        title: str = 'Network loafing',
) -> str:
    """Markdown section (heading, table, image link) for a model card or report.

    Columns: full-net top-1 and mean / min / median subnet top-1 (full net excluded), plus the same after
    per-subnet BN re-estimation when it was run, plus differences to the first model when there are several.
    """
    if not summary_rows:
        return ''
    recal = 'full_top1_bnrecal' in summary_rows[0]
    columns = [('full_top1', 'full net'), ('mean_top1', 'mean subnet'), ('min_top1', 'min subnet'),
               ('median_top1', 'median subnet')]
    if recal:
        columns += [('full_top1_bnrecal', 'full net, BN re-est.'), ('mean_top1_bnrecal', 'mean subnet, BN re-est.'),
                    ('min_top1_bnrecal', 'min subnet, BN re-est.')]
    several = len(summary_rows) > 1
    header = ['model', 'subnets'] + [c[1] for c in columns]
    if several:
        header += ['full net vs first', 'mean subnet vs first']
    lines = [f'## {title}', '',
             'Top-1 accuracy (%) of residual subnetworks (a prefix of the blocks of every stage runs, skipped '
             'blocks are the identity) on the validation split. "subnet" columns exclude the full network.'
             + (' "BN re-est." = BatchNorm statistics re-estimated for each subnet on training images.' if recal else ''),
             '', '| ' + ' | '.join(header) + ' |', '|' + '|'.join(['---'] + ['---:'] * (len(header) - 1)) + '|']
    for e in summary_rows:
        cells = [str(e['model']), str(e['num_subnets'])] + [_fmt(e.get(k)) for k, _ in columns]
        if several:
            cells += [_fmt(e.get('gap_full_top1'), signed=True), _fmt(e.get('gap_mean_top1'), signed=True)]
        lines.append('| ' + ' | '.join(cells) + ' |')
    if plot_filename:
        lines += ['', f'![Subnet top-1 vs relative FLOPs]({plot_filename})']
    return '\n'.join(lines) + '\n'


# ------------------------------------------------------------------------------------------------------- plot


def plot_loafing(
        results: Sequence[Dict[str, Any]],
        path: Union[str, Path],
        title: Optional[str] = None,
        dodge: float = 0.006,
) -> Path:
    """PNG of subnet top-1 vs relative FLOPs, one colour per model, full networks as black-edged stars.

    When BN re-estimation was run, a second panel shows the recalibrated accuracies. Models are shifted
    by `dodge` x-units from each other so that subnets with equal FLOPs stay visible (said on the axis).
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    panels = [('top1', 'BN statistics as trained')]
    if _has_bnrecal(results):
        images = max(int(r.get('bn_recal_images') or 0) for r in results)
        panels.append(('top1_bnrecal', f'BN statistics re-estimated per subnet ({images} train images)'))
    groups = _group_by_model(results)
    colors = plt.get_cmap('tab10' if len(groups) <= 10 else 'tab20')
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 5.2), sharey=True, squeeze=False)
    handles = []
    for ax, (key, panel_title) in zip(axes[0], panels):
        handles = []
        for i, (label, rows) in enumerate(groups.items()):
            color = colors(i % colors.N)
            shift = dodge * (i - (len(groups) - 1) / 2) if len(groups) > 1 else 0.0
            subs = [r for r in rows if not r['is_full'] and r.get(key) is not None]
            fulls = [r for r in rows if r['is_full'] and r.get(key) is not None]
            handles.append(ax.scatter(
                [r['rel_flops'] + shift for r in subs], [r[key] for r in subs], s=24, alpha=0.75, color=color,
                edgecolors='none', label=f'{label}: subnets ({len(subs)})'))
            ax.scatter([r['rel_flops'] + shift for r in fulls], [r[key] for r in fulls], s=200, marker='*',
                       color=color, edgecolors='black', linewidths=0.9, zorder=5)
        xlabel = 'relative FLOPs (subnet / full network, counted)'
        ax.set_xlabel(xlabel + ('\n(models offset slightly along x for visibility)' if len(groups) > 1 else ''))
        ax.set_title(panel_title, fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel('top-1 accuracy (%)')
    handles.append(Line2D([], [], marker='*', color='lightgray', markeredgecolor='black', linestyle='',
                          markersize=14, label='full network (star, colour = model)'))
    fig.legend(handles=handles, loc='lower center', ncol=min(len(handles), 4), fontsize=9, frameon=False)
    fig.suptitle(title or 'Network loafing: top-1 of residual subnetworks vs. their relative FLOPs')
    rows_of_legend = math.ceil(len(handles) / min(len(handles), 4))
    fig.tight_layout(rect=(0, 0.02 + 0.045 * rows_of_legend, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------- output


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_results(
        results: Sequence[Dict[str, Any]],
        output_dir: Union[str, Path],
        summary: Optional[Sequence[Dict[str, Any]]] = None,
        meta: Optional[Dict[str, Any]] = None,
        plot: bool = True,
        title: Optional[str] = None,
) -> Dict[str, Path]:
    """Write loafing.csv (one row per model x subnet), loafing.json (results, summary, meta) and loafing.png."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = list(summary) if summary is not None else summarize(results)
    files = {'csv': out / 'loafing.csv', 'json': out / 'loafing.json'}
    with files['csv'].open('w', newline='', encoding='utf-8') as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_FIELDS, extrasaction='ignore')
        writer.writeheader()
        for row in results:
            writer.writerow({k: ('' if row.get(k) is None else row.get(k)) for k in RESULT_FIELDS})
    payload = {'meta': meta or {}, 'summary': summary, 'results': list(results)}
    files['json'].write_text(json.dumps(_json_safe(payload), indent=2) + '\n', encoding='utf-8')
    if plot:
        files['png'] = plot_loafing(results, out / 'loafing.png', title=title)
    return files


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
    val_batches = _cache_batches(val_loader)
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


# ------------------------------------------------------------------------------------------------ model loading


def _read_yaml(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        return {}
    import yaml
    loaded = yaml.safe_load(path.read_text(encoding='utf-8'))
    return loaded if isinstance(loaded, dict) else {}


def _checkpoint_weights(checkpoint: Any, use_ema: bool) -> Dict[str, torch.Tensor]:
    if not isinstance(checkpoint, dict):
        return {}
    for key in (('state_dict_ema', 'model_ema') if use_ema else ('state_dict', 'model')):
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    return checkpoint if all(isinstance(v, torch.Tensor) for v in checkpoint.values()) else {}


def _strip_prefixes(key: str) -> str:
    while key.startswith(('module.', '_orig_mod.')):
        key = key.split('.', 1)[1]
    return key


def _infer_num_classes(model_name: str, weights: Dict[str, torch.Tensor], model_kwargs: Dict[str, Any]) -> Optional[int]:
    """Classifier size read from the checkpoint's head weight (the head's name comes from timm's cfg)."""
    import timm
    probe = timm.create_model(model_name, pretrained=False, **model_kwargs)
    head = probe.pretrained_cfg.get('classifier')
    heads = head if isinstance(head, (tuple, list)) else [head] if head else []
    cleaned = {_strip_prefixes(k): v for k, v in weights.items()}
    for name in heads:
        weight = cleaned.get(f'{name}.weight')
        if isinstance(weight, torch.Tensor) and weight.ndim >= 1:
            return int(weight.shape[0])
    return None


def _train_args(checkpoint: Any, folder: Path) -> Dict[str, Any]:
    """Training args: the folder's args.yaml, overridden by the args stored in the checkpoint."""
    args = _read_yaml(folder / 'args.yaml')
    stored = checkpoint.get('args') if isinstance(checkpoint, dict) else None
    if isinstance(stored, argparse.Namespace):
        stored = vars(stored)
    if isinstance(stored, dict):
        args.update(stored)
    return args


def _model_kwargs_from_args(args: Dict[str, Any]) -> Dict[str, Any]:
    """timm.create_model kwargs a training run used (its --model-kwargs plus train.py's creation args)."""
    kwargs = {k: args[k] for k in _CREATE_ARGS if args.get(k) is not None}
    extra = args.get('model_kwargs')
    if isinstance(extra, dict):
        kwargs.update(extra)
    return kwargs


def _data_config_from_args(args: Dict[str, Any]) -> Dict[str, Any]:
    config = {k: args[k] for k in _DATA_KEYS if args.get(k) not in (None, '')}
    if 'input_size' not in config and args.get('img_size'):
        config['img_size'] = args['img_size']
    return config


def _data_config_from_model(model: nn.Module) -> Dict[str, Any]:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return {k: cfg[k] for k in _DATA_KEYS if cfg.get(k) is not None}


def _is_timm_model_folder(path: Path) -> bool:
    """A folder timm's `local-dir:` loader reads: config.json with safetensors or .bin weights (any such folder,
    not only our own exports, which `hub.is_export_folder` checks)."""
    return path.is_dir() and (path / 'config.json').is_file() and (
        (path / 'model.safetensors').is_file() or (path / 'pytorch_model.bin').is_file())


def _train_folder_checkpoint(folder: Path, checkpoint: str) -> Optional[Path]:
    """The requested checkpoint of a training folder; 'best' falls back to the last one (runs without eval)."""
    names = [_CHECKPOINT_NAMES.get(checkpoint, checkpoint)]
    if checkpoint == 'best':
        names += ['last.pth.tar', 'checkpoint.pth.tar']
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _has_checkpoints(folder: Path) -> bool:
    return any(folder.glob('*.pth.tar'))


def _default_label(path: Path) -> str:
    if path.is_file() and path.name in (*_CHECKPOINT_NAMES.values(), 'checkpoint.pth.tar'):
        return path.parent.name
    return path.name if path.is_dir() else path.stem.replace('.pth', '')


def _load_hub_model(source: str, num_classes: Optional[int], model_kwargs: Dict[str, Any]) -> Tuple[nn.Module, Dict]:
    import timm
    kwargs = dict(model_kwargs)
    if num_classes:
        kwargs['num_classes'] = num_classes
    model = timm.create_model(source, pretrained=True, **kwargs)
    info = dict(kind='hub' if source.startswith('hf-hub:') else 'local_dir', checkpoint=None, weights='pretrained',
                model_name=model.pretrained_cfg.get('architecture') or source, train_args={},
                data_config=_data_config_from_model(model), label=source.split(':', 1)[1].rstrip('/').split('/')[-1])
    return model, info


def load_model_for_loafing(
        source: Union[str, Path],
        model_name: Optional[str] = None,
        num_classes: Optional[int] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        checkpoint: str = 'best',
        use_ema: bool = False,
        device: Optional[Union[str, torch.device]] = None,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Build a trained model from a checkpoint, a train_stim.py output folder, an export folder or the Hub.

    Args:
        source: 'hf-hub:owner/name', 'local-dir:/path', an export folder (config.json + weights), a training
            output folder (args.yaml + model_best.pth.tar / last.pth.tar), or a checkpoint file.
        model_name: timm architecture; needed for a bare checkpoint without 'arch'/'args' or args.yaml.
        num_classes: classifier size; default from the run's args, else read off the checkpoint's head.
        model_kwargs: extra timm.create_model kwargs (override the run's).
        checkpoint: which checkpoint of a training folder: 'best' (model_best.pth.tar, default), 'last',
            or a file name.
        use_ema: load the EMA weights of the checkpoint.
        device: where to put the model.

    Returns:
        The model in eval mode and an info dict (kind, label, model_name, num_classes, checkpoint, weights,
        model_kwargs, data_config from the run or export, train_args).
    """
    import timm

    model_kwargs = dict(model_kwargs or {})
    text = str(source)
    path = Path(text)
    if text.startswith(('hf-hub:', 'local-dir:')):
        model, info = _load_hub_model(text, num_classes, model_kwargs)
    elif path.is_dir() and not _has_checkpoints(path) and any(map(_is_timm_model_folder, (path, path / 'hf_export'))):
        export = path if _is_timm_model_folder(path) else path / 'hf_export'
        model, info = _load_hub_model(f'local-dir:{export}', num_classes, model_kwargs)
        info['label'] = path.name
    else:
        if path.is_dir():
            ckpt_path = _train_folder_checkpoint(path, checkpoint)
            if ckpt_path is None:
                found = ', '.join(sorted(p.name for p in path.glob('*.pth.tar'))) or 'none'
                raise FileNotFoundError(
                    f'{path}: no {_CHECKPOINT_NAMES.get(checkpoint, checkpoint)} (checkpoints there: {found}) and no '
                    f'export (config.json + model.safetensors); choose one with --checkpoint best|last|FILE')
        elif path.is_file():
            ckpt_path = path
        else:
            raise FileNotFoundError(f'model source {text!r} is neither a file, a folder, nor hf-hub:/local-dir:')
        contents = read_checkpoint(ckpt_path)
        args = _train_args(contents, ckpt_path.parent)
        # timm's CheckpointSaver stores 'arch' = args.model, or the lower-cased class name ('resnet') without args
        arch = contents.get('arch') if isinstance(contents, dict) else None
        name = model_name or args.get('model') or (arch if isinstance(arch, str) and timm.is_model(arch) else None)
        if not name:
            raise ValueError(f'{ckpt_path}: the checkpoint does not name its architecture (no "arch", no args, no '
                             f'args.yaml next to it); pass --model NAME (and --num-classes)')
        kwargs = {**_model_kwargs_from_args(args), **model_kwargs}
        classes = num_classes or args.get('num_classes') or _infer_num_classes(
            name, _checkpoint_weights(contents, use_ema), kwargs)
        del contents
        model = timm.create_model(name, pretrained=False, num_classes=classes, **kwargs)
        weights = load_checkpoint_into(model, ckpt_path, use_ema=use_ema)
        info = dict(kind='train_dir' if path.is_dir() else 'checkpoint', checkpoint=str(ckpt_path),
                    weights=weights or 'state_dict', model_name=name, train_args=args,
                    data_config=_data_config_from_args(args), label=_default_label(path))
    if info['kind'] in ('train_dir', 'checkpoint'):
        model_kwargs = {**_model_kwargs_from_args(info['train_args']), **model_kwargs}
    info.update(source=text, num_classes=getattr(model, 'num_classes', num_classes), model_kwargs=model_kwargs)
    if device is not None:
        model.to(device)
    return model.eval(), info


# ------------------------------------------------------------------------------------------------------- data


def resolve_eval_data_config(
        model: nn.Module,
        overrides: Optional[Dict[str, Any]] = None,
        run_config: Optional[Dict[str, Any]] = None,
        digits: bool = False,
) -> Dict[str, Any]:
    """Eval preprocessing: explicit overrides > the training run's (or export's) config > digits defaults
    (when evaluating on the embedded digits) > the model's timm defaults."""
    import timm.data
    merged: Dict[str, Any] = {}
    if digits:
        from .data import DIGITS_INFO
        merged.update({k: DIGITS_INFO[k] for k in _DATA_KEYS if k in DIGITS_INFO})
    for source in (run_config or {}, overrides or {}):
        if source.get('img_size') and not source.get('input_size'):
            merged.pop('input_size', None)
        merged.update({k: v for k, v in source.items() if v not in (None, '')})
    return timm.data.resolve_data_config(merged, model=model)


def create_eval_loader(
        dataset: str = '',
        data_dir: Optional[str] = None,
        split: str = 'validation',
        data_config: Optional[Dict[str, Any]] = None,
        batch_size: int = 128,
        workers: int = 2,
        num_samples: Optional[int] = None,
        seed: int = 0,
        device: Optional[Union[str, torch.device]] = None,
) -> torch.utils.data.DataLoader:
    """A loader of `split` with timm eval transforms (resize, centre crop, normalise), unshuffled.

    With no `dataset` and no `data_dir` it serves the embedded digits (timm_stim.data). `num_samples`
    keeps a fixed random subset (drawn with `seed`) of that many images, e.g. training images for BN
    re-estimation or a quick validation subset.
    """
    import timm.data
    from .data import create_dataset_or_digits
    config = dict(data_config or {})
    input_size = tuple(config.get('input_size', (3, 224, 224)))
    ds = create_dataset_or_digits(dataset or '', data_dir, split, is_training=False, img_size=int(input_size[-1]))
    ds.transform = timm.data.create_transform(
        input_size, is_training=False, interpolation=config.get('interpolation', 'bilinear'),
        mean=config.get('mean', timm.data.IMAGENET_DEFAULT_MEAN), std=config.get('std', timm.data.IMAGENET_DEFAULT_STD),
        crop_pct=config.get('crop_pct'), crop_mode=config.get('crop_mode'))
    if num_samples and not isinstance(ds, torch.utils.data.IterableDataset) and num_samples < len(ds):
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
        ds = torch.utils.data.Subset(ds, sorted(order[:num_samples].tolist()))
    pin = torch.device(device).type == 'cuda' if device is not None else False
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin, drop_last=False,
        persistent_workers=False)


# -------------------------------------------------------------------------------------------------------- CLI


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python -m timm_stim.loafing',
        description='Measure network loafing: accuracy of the residual subnetworks of trained models, '
                    'with relative depth and counted relative FLOPs.')
    parser.add_argument('sources', nargs='+', metavar='MODEL',
                        help='train_stim.py output folder, checkpoint file, export folder, hf-hub:... or local-dir:...')
    parser.add_argument('--labels', nargs='+', default=None, help='one label per model (default: folder/file names)')
    group = parser.add_argument_group('model')
    group.add_argument('--model', default=None, help='timm architecture of bare checkpoints (e.g. resnet50)')
    group.add_argument('--num-classes', type=int, default=None, help='classifier size of bare checkpoints')
    group.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                       help='extra timm.create_model kwargs, e.g. dynamic_img_size=True')
    group.add_argument('--checkpoint', default='best',
                       help="checkpoint of a training folder: 'best' (model_best.pth.tar), 'last', or a file name")
    group.add_argument('--use-ema', action='store_true', help='evaluate the EMA weights of the checkpoints')
    group = parser.add_argument_group('data (same flags as train_stim.py; default: the run\'s, else digits)')
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
    group.add_argument('-b', '--batch-size', type=int, default=128)
    group.add_argument('-j', '--workers', type=int, default=2)
    group.add_argument('--val-num-samples', type=int, default=None,
                       help='evaluate on a fixed random subset of this many validation images')
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


def _labels(args: argparse.Namespace, infos: List[Dict[str, Any]]) -> List[str]:
    if args.labels is not None and len(args.labels) != len(infos):
        raise ValueError(f'--labels gives {len(args.labels)} labels for {len(infos)} models; give one per model')
    labels = list(args.labels) if args.labels else [i['label'] for i in infos]
    seen: Dict[str, int] = {}
    for i, label in enumerate(labels):  # keep labels unique so summary rows don't merge
        if label in seen:
            seen[label] += 1
            labels[i] = f'{label}#{seen[label]}'
        else:
            seen[label] = 1
    return labels


def _data_args(args: argparse.Namespace, run_args: Dict[str, Any]) -> Dict[str, Any]:
    """Dataset flags: the command line, else what the first model's training run used, else digits."""
    def pick(key: str, default: Any) -> Any:
        value = getattr(args, key)
        return value if value is not None else (run_args.get(key) or default)
    dataset = pick('dataset', '')
    data_dir = args.data_dir if args.data_dir is not None else (run_args.get('data_dir') or run_args.get('data') or None)
    if args.dataset is not None or args.data_dir is not None:  # an explicit dataset: don't mix with the run's
        dataset, data_dir = args.dataset or '', args.data_dir
    return dict(dataset=dataset, data_dir=data_dir, val_split=pick('val_split', 'validation'),
                train_split=pick('train_split', 'train'))


def _overrides(args: argparse.Namespace) -> Dict[str, Any]:
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


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """The CLI's work: load models, build loaders, evaluate, write files; returns results and summary."""
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    model_kwargs = parse_model_kwargs(args.model_kwargs)
    loaded = [load_model_for_loafing(s, args.model, args.num_classes, model_kwargs, args.checkpoint,
                                     args.use_ema, device) for s in args.sources]
    infos = [info for _, info in loaded]
    labels = _labels(args, infos)
    data = _data_args(args, infos[0]['train_args'])
    digits = data['dataset'].lower() == 'digits' or (not data['dataset'] and not data['data_dir'])
    data_config = resolve_eval_data_config(loaded[0][0], _overrides(args), infos[0]['data_config'], digits)
    for label, info in zip(labels[1:], infos[1:]):
        other = info['data_config'].get('input_size')
        if other and tuple(other) != tuple(data_config['input_size']):
            print(f'warning: {label} was trained at input size {tuple(other)}, evaluating all models at '
                  f'{tuple(data_config["input_size"])}', file=sys.stderr)
    print(f"data: {data['dataset'] or ('digits' if digits else 'folder')} {data['data_dir'] or ''} "
          f"split={data['val_split']} input_size={tuple(data_config['input_size'])} "
          f"mean={tuple(round(m, 4) for m in data_config['mean'])} crop_pct={data_config['crop_pct']}", file=sys.stderr)
    val_loader = create_eval_loader(data['dataset'], data['data_dir'], data['val_split'], data_config,
                                    args.batch_size, args.workers, args.val_num_samples, args.seed, device)
    train_loader = None
    if args.bn_recal > 0:
        train_loader = create_eval_loader(data['dataset'], data['data_dir'], data['train_split'], data_config,
                                          args.batch_size, args.workers, args.bn_recal, args.seed, device)
        train_loader = _cache_batches(train_loader)
    val_batches = _cache_batches(val_loader)

    input_size = tuple(data_config['input_size'])
    plans = []
    for (model, _), label in zip(loaded, labels):
        layout = find_residual_blocks(model, input_size=input_size)
        staged, specs = make_subnet_specs(layout, args.subnets, args.space, args.depths, args.seed, args.pseudo_stages)
        plans.append((model, label, staged, specs))
        print(f'{label}: {layout}; {len(specs)} subnets ({args.space} space)', file=sys.stderr)

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


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        out = run(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        return report_error(e, 1)
    print(format_summary(out['summary']))
    print('\nwrote ' + ', '.join(str(p) for p in out['files'].values()))
    return 0


if __name__ == '__main__':
    sys.exit(main())
