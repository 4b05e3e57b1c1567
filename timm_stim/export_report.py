"""Measuring and reporting exported subnetworks: latency, Pareto front and plot, family table, model cards."""
from __future__ import annotations

import copy
import csv
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from .card import create_model_card, split_recipe
from .flops import try_forward_flops
from .loafing import _accuracy
from .run_state import replace_file

__all__ = ['LATENCY_BATCH_SIZES', 'pareto_front', 'select_pareto', 'read_loafing_table', 'measure_latency',
           'machine_description', 'measure_model', 'plot_pareto', 'family_markdown', 'subnet_card']

LATENCY_BATCH_SIZES = (1, 32)


def pareto_front(rows: Sequence[Dict[str, Any]], metric: str = 'top1') -> List[Dict[str, Any]]:
    """Rows no other row beats on both FLOPs (fewer) and `metric` (higher), cheapest first."""
    front: List[Dict[str, Any]] = []
    for row in sorted(rows, key=lambda r: (float(r['flops']), -float(r[metric]))):
        if not front or float(row[metric]) > float(front[-1][metric]):
            front.append(row)
    return front


def select_pareto(rows: Sequence[Dict[str, Any]], count: int, metric: str = 'top1') -> List[Dict[str, Any]]:
    """`count` subnets (the full net excluded) spread evenly along the accuracy-vs-FLOPs front, cheapest first."""
    front = pareto_front([r for r in rows if not r['is_full'] and r.get(metric) is not None], metric)
    if len(front) <= count:
        return front
    if count == 1:
        return [front[-1]]
    picks = sorted({round(i * (len(front) - 1) / (count - 1)) for i in range(count)})
    return [front[i] for i in picks]


def _truthy(value: Any) -> bool:
    return value is True or str(value).strip().lower() in ('true', '1')


def read_loafing_table(path: Union[str, Path], label: Optional[str] = None) -> List[Dict[str, Any]]:
    """Rows of one model from a loafing.csv / loafing.json (or a folder holding one), with typed columns."""
    path = Path(path)
    if path.is_dir():
        path = next((path / n for n in ('loafing.json', 'loafing.csv') if (path / n).is_file()), path / 'loafing.csv')
    if not path.is_file():
        raise FileNotFoundError(f'loafing table {path} does not exist; run python -m timm_stim.loafing first or '
                                'leave out --loafing-table to compute it')
    if path.suffix == '.json':
        rows = json.loads(path.read_text(encoding='utf-8')).get('results', [])
    else:
        with path.open(newline='', encoding='utf-8') as f:
            rows = list(csv.DictReader(f))
    labels = list(dict.fromkeys(str(r.get('model')) for r in rows))
    if not rows or not {'keep', 'flops', 'top1', 'is_full'} <= set(rows[0]):
        raise ValueError(f'{path} is not a loafing table (needs keep, flops, top1 and is_full columns)')
    if label is None and len(labels) > 1:
        raise ValueError(f"{path} holds several models ({', '.join(labels)}); choose one with --loafing-model")
    label = labels[0] if label is None else label
    if label not in labels:
        raise ValueError(f"{path} has no model {label!r} (it has {', '.join(labels)})")
    typed = []
    for r in rows:
        if str(r.get('model')) != label:
            continue
        entry = dict(r, is_full=_truthy(r['is_full']), flops=float(r['flops']), keep=str(r['keep']))
        for key in ('top1', 'top5', 'top1_bnrecal', 'top5_bnrecal'):
            entry[key] = float(r[key]) if r.get(key) not in (None, '') else None
        typed.append(entry)
    return typed


# ---------------------------------------------------------------------------------------------------- measuring


@torch.inference_mode()
def measure_latency(model: nn.Module, input_size: Sequence[int], batch_size: int, repeats: int = 10,
                    warmup: int = 2) -> float:
    """Median wall time (ms) of one eval forward of a `batch_size` batch on the model's device, `repeats` runs."""
    param = next(model.parameters())
    x = torch.randn(batch_size, *input_size, device=param.device, dtype=param.dtype)
    model.eval()
    sync = torch.cuda.synchronize if param.device.type == 'cuda' else (lambda: None)
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        model(x)
        sync()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def machine_description() -> str:
    """The CPU the latencies were measured on, for the card."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                cpu = line.split(':', 1)[1].strip()
                break
    except OSError:
        pass
    return f'{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}'


def measure_model(
        model: nn.Module,
        input_size: Sequence[int],
        val_batches: Optional[Sequence] = None,
        device: Optional[torch.device] = None,
        latency_repeats: int = 10,
) -> Dict[str, Any]:
    """Parameters, counted FLOPs (one image; None with the reason in 'flops_note' when they cannot be counted),
    CPU latency (ms, median) at batch 1 and 32, and top-1/top-5 on `val_batches`.

    The model is measured as the plain model it is: no block discovery, so a subnet with nothing left to skip
    (every remaining block has a projection shortcut) is measured like any other."""
    flops, note = try_forward_flops(model, input_size)
    figures: Dict[str, Any] = dict(params=sum(p.numel() for p in model.parameters()), flops=flops,
                                   flops_note=note or None)
    if val_batches is not None:
        device = torch.device(device) if device is not None else next(model.parameters()).device
        was_training = model.training
        try:
            top1, top5, _ = _accuracy(model.eval(), val_batches, device)
        finally:
            model.train(was_training)
        figures.update(top1=top1, top5=top5)
    cpu_model = model if next(model.parameters()).device.type == 'cpu' else copy.deepcopy(model).cpu()
    for batch_size in LATENCY_BATCH_SIZES:
        figures[f'latency_b{batch_size}_ms'] = measure_latency(cpu_model, input_size, batch_size, latency_repeats)
    return figures


# -------------------------------------------------------------------------------------------------------- plot


def plot_pareto(rows: Sequence[Dict[str, Any]], path: Union[str, Path], title: str = '') -> Path:
    """PNG of top-1 vs CPU latency (batch 1 and batch 32 per image), one point per model, full model a star,
    the accuracy-vs-latency front joined by a line."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    panels = [('latency_b1_ms', 1, 'CPU latency, batch 1 (ms per image)'),
              ('latency_b32_ms', 32, 'CPU latency, batch 32 (ms per image)')]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    for ax, (key, batch, label) in zip(axes, panels):
        points = [dict(r, x=r[key] / batch) for r in rows if r.get('top1') is not None]
        front = pareto_front([dict(p, flops=p['x']) for p in points])
        ax.plot([p['x'] for p in front], [p['top1'] for p in front], color='tab:blue', alpha=0.5, zorder=1)
        for p in points:
            full = p['is_full']
            ax.scatter(p['x'], p['top1'], s=160 if full else 40, marker='*' if full else 'o', zorder=3,
                       color='gold' if full else 'tab:blue', edgecolors='black', linewidths=0.8)
            ax.annotate('full' if full else p['depths'], (p['x'], p['top1']), textcoords='offset points',
                        xytext=(5, 4), fontsize=8)
        ax.set_xlabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel('top-1 accuracy (%)')
    fig.suptitle(title or 'Exported subnetworks: accuracy vs CPU latency (star: full model)')
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # written under a new name and swapped in: never through a link that holds the name
        replace_file(str(path), lambda f: fig.savefig(f, format='png', dpi=120), mode='wb')
    finally:
        plt.close(fig)
    return path


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return '-'
    if isinstance(value, float):
        return f'{value:.{digits}f}'
    if isinstance(value, int) and value >= 10000:
        return f'{value / 1e6:.3f} M' if value < 1e9 else f'{value / 1e9:.3f} G'
    return str(value)


def family_markdown(rows: Sequence[Dict[str, Any]], machine: str, plot_filename: Optional[str] = 'pareto.png') -> str:
    """Markdown table of the exported family (full model included) and the Pareto plot."""
    lines = ['## The exported family', '',
             'Measured with `timm_stim.export` (FLOPs counted by torch.utils.flop_counter for one image; latency: '
             f'median of repeated eval forwards on CPU: {machine}; top-1/top-5 on the validation split).', '',
             '| model | depths | params | FLOPs | latency b1 (ms) | latency b32 (ms) | top-1 (%) | top-5 (%) |',
             '|---|---|---:|---:|---:|---:|---:|---:|']
    for r in rows:
        name = 'full model' if r['is_full'] and not r.get('folder') else (r.get('repo_id') or r['name'])
        lines.append(f"| {name} | {r['depths']} | {fmt(r['params'])} | {fmt(r['flops'])} | "
                     f"{fmt(r['latency_b1_ms'])} | {fmt(r['latency_b32_ms'])} | {fmt(r.get('top1'))} | "
                     f"{fmt(r.get('top5'))} |")
    if plot_filename:
        lines += ['', f'![Top-1 vs CPU latency of the exported subnetworks]({plot_filename})']
    return '\n'.join(lines) + '\n'


def subnet_card(row: Dict[str, Any], full: Dict[str, Any], rows: Sequence[Dict[str, Any]], parent: str,
                 arch: str, dataset: str, train_args: Dict[str, Any], machine: str, license: Optional[str]) -> str:
    """Model card of one exported subnet: parent run, depth, measured figures, the family, how to load."""
    recipe, stim = split_recipe(train_args)
    bn = (f"re-estimated for this subnet on {row['bn_recal_images']} training images (`--bn-recal`)"
          if row['bn_recal_images'] else "the parent's, as trained")
    about = (
        f"## Subnetwork of {parent}\n\n"
        f"This `{arch}` is a subnetwork of the model trained as **{parent}**: it keeps {row['depths']} residual "
        f"blocks per stage of the parent's {full['depths']} (constructor argument `{row['depth_argument']}`). Its "
        f"weights are the parent's, blocks renumbered; its logits equal the parent's run as that subnetwork "
        f"(largest relative difference on a check input {row['max_logit_diff']:.2g}). BatchNorm statistics: {bn}. "
        'Exported with `python -m timm_stim.export`.')
    metrics = {
        'depths (blocks per stage)': row['depths'], 'parent depths': full['depths'],
        'parameters': row['params'],
        'FLOPs (one image, counted)': row['flops'] if row['flops'] is not None else f"n/a ({row.get('flops_note')})",
        'CPU latency batch 1 (ms, median)': row['latency_b1_ms'],
        'CPU latency batch 32 (ms, median)': row['latency_b32_ms'],
        'top-1 (%)': row.get('top1'), 'top-5 (%)': row.get('top5'), 'full model top-1 (%)': full.get('top1'),
        'BatchNorm statistics': bn,
    }
    metrics = {k: v for k, v in metrics.items() if v is not None}
    return create_model_card(arch, row.get('repo_id'), dataset, recipe, stim, metrics, license=license,
                             extra_sections=[about, family_markdown(rows, machine)])
