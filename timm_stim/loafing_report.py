"""Reporting of loafing results: the per-model summary, a text table, a Markdown section, a plot and the files.

The rows come from ``timm_stim.loafing.evaluate_subnets`` (one per model x subnet, keys ``RESULT_FIELDS``);
accuracies are percentages and "subnet" statistics leave the full network out.
"""
from __future__ import annotations

import csv
import json
import math
import os
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

__all__ = ['RESULT_FIELDS', 'format_summary', 'loafing_markdown', 'plot_loafing', 'summarize', 'write_results']

# Columns of loafing.csv, in order (loafing.json holds the same keys per result).
RESULT_FIELDS = (
    'model', 'depths', 'keep', 'is_full', 'blocks_run', 'num_blocks', 'rel_depth', 'flops', 'rel_flops',
    'top1', 'top5', 'top1_bnrecal', 'top5_bnrecal', 'bn_recal_images', 'num_val',
)


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
    recal_note = ' "BN re-est." = BatchNorm statistics re-estimated for each subnet on training images.'
    lines = [f'## {title}', '',
             'Top-1 accuracy (%) of residual subnetworks (a prefix of the blocks of every stage runs, skipped '
             'blocks are the identity) on the validation split. "subnet" columns exclude the full network.'
             + (recal_note if recal else ''),
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
    """Write loafing.csv (one row per model x subnet), loafing.json (results, summary, meta) and loafing.png.

    Each file is written whole beside its name and swapped in (`replace_file`): a report in a folder from
    elsewhere never writes through a planted link, and an interrupted write leaves the previous report.
    """
    from .run_state import replace_file
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = list(summary) if summary is not None else summarize(results)
    files = {'csv': out / 'loafing.csv', 'json': out / 'loafing.json'}

    def write_csv(f):
        writer = csv.DictWriter(f, fieldnames=RESULT_FIELDS, extrasaction='ignore')
        writer.writeheader()
        for row in results:
            writer.writerow({k: ('' if row.get(k) is None else row.get(k)) for k in RESULT_FIELDS})
    replace_file(str(files['csv']), write_csv, newline='', encoding='utf-8')
    payload = {'meta': meta or {}, 'summary': summary, 'results': list(results)}
    replace_file(str(files['json']), lambda f: f.write(json.dumps(_json_safe(payload), indent=2) + '\n'),
                 encoding='utf-8')
    if plot:
        tmp = out / 'loafing.tmp.png'  # matplotlib takes the format from the suffix
        if os.path.lexists(tmp):
            os.unlink(tmp)
        plot_loafing(results, tmp, title=title)
        os.replace(tmp, out / 'loafing.png')
        files['png'] = out / 'loafing.png'
    return files
