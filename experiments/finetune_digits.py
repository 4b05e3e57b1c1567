"""Evidence experiment: Stimulative Training as a short fine-tune of a trained plain model (digits, CPU).

Per seed, with the same recipe (hparams/digits_resnet18.yaml; `--model NAME --model-kwargs ...` and `--train-flags`
swap in another model and its optimiser) on the embedded scikit-learn digits:

    base              --stim none, N epochs                         (the trained model a user starts from)
    fine-tunes        --initial-checkpoint base/last.pth.tar --lr F x recipe lr --warmup-epochs 0, k epochs:
        plain         --stim none                                   (the fair control: same k, same lr)
        st            --stim st
        st++ raw      --stim st++ --stim-main-logits raw --stim-min-scale 1
        st++ std      --stim st++ --stim-main-logits standardized --stim-min-scale 1   (the authors' main loss)
    scratch st        --stim st, N epochs                           (the target)

then measures the full net and every subnet of the model's ST space (ResNet-18: 16 depth vectors) of every final
model with `python -m timm_stim.loafing` (BN as trained and re-estimated per subnet; the same subnets for every
model of a seed) and writes docs/results/<name>.md (tables: mean +- std over seeds, paired differences for the
issue's goals), .csv (every subnet of every run) and .png.

    python experiments/finetune_digits.py                    # ResNet-18, seeds 0-2, N = 10, k in {1, 2}
    python experiments/finetune_digits.py --report-only      # rewrite docs/results from finished runs
    # ResNet-18 with headroom (N = 4, k = 1) and a small ViT (tables folded into docs/results/finetune_digits.md):
    python experiments/finetune_digits.py --epochs 4 --ks 1 --lr-factors 0.3 --stpp --name finetune_digits_n4 \
        --work-dir output/finetune_digits_n4 --results-dir output/finetune_digits_n4/report
    python experiments/finetune_digits.py --model vit_tiny_patch16_224 --model-kwargs img_size=32 patch_size=4 \
        depth=6 embed_dim=96 num_heads=3 --train-flags "--opt adamw --lr 0.001 --warmup-lr 0.00001 \
        --weight-decay 0.05" --ks 2 --lr-factors 0.1 0.3 --display "ViT (6 blocks, width 96, patch 4)" \
        --name finetune_digits_vit --work-dir output/finetune_digits_vit --results-dir output/finetune_digits_vit/report
    python experiments/finetune_digits.py --seeds 0 --epochs 2 --ks 1 --work-dir /tmp/ft --results-dir /tmp/ft

Finished trainings (summary.csv with every epoch and last.pth.tar present) are not retrained, so an interrupted
run restarts with the same command. Text after the line `<!-- hand-written -->` of an existing report is kept.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'experiments'))

from loafing_digits import _mean_rows, _pm, _run_job, finished_run  # noqa: E402

HAND_MARK = '<!-- hand-written -->'

# fine-tune kind -> (label, train_stim.py flags)
KINDS: Dict[str, Tuple[str, List[str]]] = {
    'plain': ('plain fine-tune', ['--stim', 'none']),
    'st': ('ST fine-tune', ['--stim', 'st']),
    'stpp-raw': ('ST++ fine-tune, raw main logits',
                 ['--stim', 'st++', '--stim-main-logits', 'raw', '--stim-min-scale', '1']),
    'stpp-std': ('ST++ fine-tune, standardised main logits',
                 ['--stim', 'st++', '--stim-main-logits', 'standardized', '--stim-min-scale', '1']),
}


@dataclass
class Run:
    """One training of the grid (per seed)."""
    key: str                 # folder name without the seed
    label: str               # row of the report
    flags: List[str]         # train_stim.py flags besides the common ones
    epochs: int              # epochs of this training
    total_epochs: int        # epochs of the whole path (base + fine-tune)
    parent: Optional[str] = None  # key of the run whose last.pth.tar it starts from


def parse_args(argv: Sequence[str] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--epochs', type=int, default=10, help='N: epochs of the base and of ST from scratch')
    parser.add_argument('--ks', type=int, nargs='+', default=[1, 2], help='fine-tune lengths k (epochs)')
    parser.add_argument('--lr-factors', type=float, nargs='+', default=[0.1, 0.3],
                        help='fine-tune lr = factor x the recipe lr (plain and ST, at the largest k)')
    parser.add_argument('--short-lr-factor', type=float, default=0.3,
                        help='the lr factor of the shorter fine-tunes (k < max k) and of the ST++ fine-tunes')
    parser.add_argument('--stpp', nargs='*', default=['stpp-raw', 'stpp-std'], choices=['stpp-raw', 'stpp-std'],
                        help='ST++ fine-tunes (at the largest k and --short-lr-factor)')
    parser.add_argument('--config', default=str(REPO / 'hparams' / 'digits_resnet18.yaml'))
    parser.add_argument('--model', default=None, help="timm model (default: the recipe's)")
    parser.add_argument('--model-kwargs', nargs='*', default=[], help='train_stim.py --model-kwargs k=v ...')
    parser.add_argument('--train-flags', default='', help='extra train_stim.py flags for every run (one string)')
    parser.add_argument('--base-lr', type=float, default=None, help="the from-scratch lr (default: the recipe's)")
    parser.add_argument('--display', default=None, help='model name in the report (default: the timm name)')
    parser.add_argument('--subnets', default='all', help="subnets measured: 'all' or 'random:N' (same per seed)")
    parser.add_argument('--bn-recal', type=int, default=500, help='training images per subnet BN re-estimation')
    parser.add_argument('--name', default='finetune_digits', help='results: <results-dir>/<name>.md/.csv/.png')
    parser.add_argument('--work-dir', default=str(REPO / 'output' / 'finetune_digits'))
    parser.add_argument('--results-dir', default=str(REPO / 'docs' / 'results'))
    parser.add_argument('--retries', type=int, default=3, help='retries of a failed training (60 s apart)')
    parser.add_argument('--report-only', action='store_true', help='only rewrite the results from finished runs')
    return parser.parse_args(argv)


def _recipe(args: argparse.Namespace) -> Dict[str, Any]:
    import yaml
    with open(args.config) as f:
        return yaml.safe_load(f) or {}


def base_lr(args: argparse.Namespace) -> float:
    """The lr the recipe trains from scratch with (--base-lr, else --lr in --train-flags, else the recipe's)."""
    if args.base_lr is not None:
        return args.base_lr
    words = shlex.split(args.train_flags)
    if '--lr' in words:
        return float(words[words.index('--lr') + 1])
    return float(_recipe(args)['lr'])


def grid(args: argparse.Namespace) -> List[Run]:
    """Every training of one seed, in dependency order (the base first)."""
    n, k_max = args.epochs, max(args.ks)
    runs = [Run('base', f'base (plain, {n} ep)', ['--stim', 'none'], n, n)]
    lr0 = base_lr(args)

    def finetune(kind: str, k: int, factor: float) -> Run:
        label, flags = KINDS[kind]
        flags = [*flags, '--lr', f'{factor * lr0:g}', '--warmup-epochs', '0']
        return Run(f'ft-{kind}-k{k}-lr{factor:g}', f'{label}, k={k}, lr x{factor:g}', flags, k, n + k, 'base')

    for k in sorted(args.ks):
        factors = args.lr_factors if k == k_max else [args.short_lr_factor]
        for factor in factors:
            runs += [finetune('plain', k, factor), finetune('st', k, factor)]
    runs += [finetune(kind, k_max, args.short_lr_factor) for kind in args.stpp]
    runs.append(Run('scratch-st', f'ST from scratch ({n} ep)', ['--stim', 'st'], n, n))
    return runs


def _run_dir(args: argparse.Namespace, run: Run, seed: int) -> Path:
    return Path(args.work_dir) / 'train' / f'{run.key}-s{seed}'


def train_command(args: argparse.Namespace, run: Run, seed: int) -> List[str]:
    """The train_stim.py command of one run (relative paths, so that the report can show it)."""
    out = _run_dir(args, run, seed)
    parent = ['--initial-checkpoint', os.path.relpath(_run_dir(args, Run(run.parent, '', [], 0, 0), seed)
                                                      / 'last.pth.tar', REPO)] if run.parent else []
    # --train-flags first: a fine-tune's own --lr / --warmup-epochs come later and win
    return ['python', 'train_stim.py', '-c', os.path.relpath(args.config, REPO), *shlex.split(args.train_flags),
            *run.flags, *parent, '--seed', str(seed), '--epochs', str(run.epochs), '--checkpoint-hist', '1',
            *(['--model', args.model] if args.model else []),
            *(['--model-kwargs', *args.model_kwargs] if args.model_kwargs else []),
            '--output', os.path.relpath(out.parent, REPO), '--experiment', out.name]


def _run_with_retries(name: str, command: List[str], log: Path, out: Optional[Path], retries: int) -> float:
    """Run one job; on failure (e.g. a half-made edit of the training script by someone else) remove its partial
    output folder, wait a minute and retry. Returns the wall seconds of the successful attempt."""
    for attempt in range(retries + 1):
        _, rc, seconds = _run_job(name, command, log)
        if rc == 0:
            return seconds
        if attempt < retries:
            if out is not None and out.is_dir():
                shutil.rmtree(out)
            print(f'  retrying {name} in 60 s ({attempt + 1}/{retries})', flush=True)
            time.sleep(60)
    raise SystemExit(f'failed: {name}; see {log}')


def _loafing_dir(args: argparse.Namespace, seed: int) -> Path:
    return Path(args.work_dir) / 'loafing' / f'seed{seed}'


def loafing_command(args: argparse.Namespace, seed: int) -> List[str]:
    runs = grid(args)
    return [sys.executable, '-m', 'timm_stim.loafing', *[str(_run_dir(args, r, seed)) for r in runs],
            '--labels', *[r.key for r in runs], '--checkpoint', 'last', '--subnets', args.subnets, '--space', 'st',
            '--bn-recal', str(args.bn_recal), '--seed', str(seed), '-j', '0', '-b', '128', '--device', 'cpu',
            '--output', str(_loafing_dir(args, seed)), '--title', f'Fine-tune on digits, {display(args)}, seed {seed}']


def _loafing_done(args: argparse.Namespace, seed: int) -> bool:
    """A loafing report of exactly this grid, newer than every checkpoint it evaluates."""
    report = _loafing_dir(args, seed) / 'loafing.json'
    if not report.is_file():
        return False
    runs = grid(args)
    labels = {r['model'] for r in json.loads(report.read_text())['results']}
    checkpoints = [_run_dir(args, r, seed) / 'last.pth.tar' for r in runs]
    return (labels == {r.key for r in runs} and all(c.is_file() for c in checkpoints)
            and report.stat().st_mtime > max(c.stat().st_mtime for c in checkpoints))


def run_all(args: argparse.Namespace, timings: Dict[str, float], save) -> None:
    """Seed by seed: every training not finished yet (one at a time), then the seed's loafing report."""
    for seed in args.seeds:
        for run in grid(args):
            out = _run_dir(args, run, seed)
            if finished_run(out, run.epochs):
                print(f'  skip {out.name}: finished run exists', flush=True)
                continue
            if out.is_dir():  # an interrupted run: train_stim.py refuses to overwrite it
                shutil.rmtree(out)
            command = train_command(args, run, seed)
            command[:2] = [sys.executable, str(REPO / 'train_stim.py')]
            timings[out.name] = _run_with_retries(out.name, command, out.parent / f'{out.name}.log', out,
                                                  args.retries)
            save()
        if not _loafing_done(args, seed):
            out = _loafing_dir(args, seed)
            timings[f'loafing seed{seed}'] = _run_with_retries(
                f'loafing seed{seed}', loafing_command(args, seed), out.parent / f'{out.name}.log', None, 1)
            save()


# ----------------------------------------------------------------------------------------------- aggregation

def display(args: argparse.Namespace) -> str:
    if args.display:
        return args.display
    name = args.model or _recipe(args).get('model', 'resnet18')
    return {'resnet18': 'ResNet-18', 'resnet34': 'ResNet-34'}.get(name, name)


_METRICS = ('full_top1', 'mean_top1', 'min_top1', 'full_top1_bnrecal', 'mean_top1_bnrecal', 'min_top1_bnrecal')


def collect(args: argparse.Namespace) -> Tuple[List[Dict[str, Any]], Dict[str, Dict[str, List[float]]]]:
    """Every subnet row of every run, and per run key the per-seed summary metrics (seed order kept)."""
    runs = {r.key: r for r in grid(args)}
    rows: List[Dict[str, Any]] = []
    per_run: Dict[str, Dict[str, List[float]]] = {k: {m: [] for m in _METRICS} for k in runs}
    for seed in args.seeds:
        payload = json.loads((_loafing_dir(args, seed) / 'loafing.json').read_text())
        for r in payload['results']:
            rows.append(dict(run=r['model'], label=runs[r['model']].label, seed=seed, **r))
        for s in payload['summary']:
            for m in _METRICS:
                per_run[s['model']][m].append(float(s[m]))
    return rows, per_run


def _final_top1(run_dir: Path) -> float:
    """The last eval top-1 the training logged (cross-check of the measured full net)."""
    with (run_dir / 'summary.csv').open(newline='') as f:
        return float(list(csv.DictReader(f))[-1]['eval_top1'])


def _paired(a: List[float], b: List[float]) -> Tuple[float, float]:
    """Mean of the per-seed differences a - b and its standard error (seeds paired: they share the base)."""
    diffs = [x - y for x, y in zip(a, b)]
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float('nan')
    return mean, se


def _fmt(diff: Tuple[float, float]) -> str:
    mean, se = diff
    return f'{mean:+.2f} ± {se:.2f}' if math.isfinite(se) else f'{mean:+.2f}'


def main_table(args: argparse.Namespace, per_run: Dict[str, Dict[str, List[float]]],
               timings: Dict[str, float]) -> str:
    header = ('| model | epochs (new / total) | train wall s | full net | mean subnet | worst subnet '
              '| mean subnet, BN re-est. | worst subnet, BN re-est. | full net, BN re-est. |')
    lines = [header, '|---|---:|---:|---:|---:|---:|---:|---:|---:|']
    for run in grid(args):
        m = per_run[run.key]
        walls = [timings[f'{run.key}-s{s}'] for s in args.seeds if f'{run.key}-s{s}' in timings]
        wall = f'{statistics.fmean(walls):.0f}' if walls else 'n/a'
        new = run.epochs
        cells = [run.label, f'{new} / {run.total_epochs}', wall,
                 *[_pm(m[k]) for k in ('full_top1', 'mean_top1', 'min_top1', 'mean_top1_bnrecal',
                                       'min_top1_bnrecal', 'full_top1_bnrecal')]]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def goals_table(args: argparse.Namespace, per_run: Dict[str, Dict[str, List[float]]]) -> str:
    """The issue's goals, as paired differences (mean over seeds ± standard error) with a verdict."""
    runs = grid(args)
    lines = ['| goal | fine-tune | measured | target | met |', '|---|---|---:|---|---|']

    def row(goal: str, label: str, diff: Tuple[float, float], target: str, ok: bool) -> None:
        lines.append(f'| {goal} | {label} | {_fmt(diff)} | {target} | {"yes" if ok else "**no**"} |')

    scratch = per_run['scratch-st']
    for run in runs:
        if not run.key.startswith('ft-') or run.key.startswith('ft-plain'):
            continue
        control = per_run[run.key.replace(run.key.split('-k')[0], 'ft-plain')] \
            if run.key.replace(run.key.split('-k')[0], 'ft-plain') in per_run else None
        me = per_run[run.key]
        short = run.label.replace(' fine-tune', '')
        for key, what in (('mean_top1_bnrecal', 'BN re-est.'), ('mean_top1', 'as trained; not the goal')):
            if control is not None:
                d = _paired(me[key], control[key])
                row(f'mean subnet ({what}) vs plain fine-tune', short, d, '>= +1.00', d[0] >= 1.0)
            d = _paired(me[key], scratch[key])
            row(f'mean subnet ({what}) vs ST from scratch', short, d, '>= -1.00', d[0] >= -1.0)
        if control is not None:
            d = _paired(me['full_top1'], control['full_top1'])
            limit = 0.5 if run.key.startswith('ft-stpp') else 0.3
            row('full net vs plain fine-tune', short, d, f'>= -{limit:.2f}', d[0] >= -limit)
        frac = run.epochs / args.epochs
        lines.append(f'| epochs vs ST from scratch | {short} | {run.epochs} / {args.epochs} = {frac:.0%} | <= 25 % '
                     f'| {"yes" if frac <= 0.25 else "**no**"} |')
    return '\n'.join(lines)


def reference_table(args: argparse.Namespace, per_run: Dict[str, Dict[str, List[float]]]) -> str:
    """Plain fine-tune and ST from scratch against the base (what the extra epochs alone do)."""
    lines = ['| model | full net | mean subnet | mean subnet, BN re-est. | worst subnet, BN re-est. |',
             '|---|---:|---:|---:|---:|']
    base = per_run['base']
    for run in grid(args):
        if run.key == 'base':
            continue
        m = per_run[run.key]
        lines.append('| ' + ' | '.join([run.label, *[_fmt(_paired(m[k], base[k])) for k in (
            'full_top1', 'mean_top1', 'mean_top1_bnrecal', 'min_top1_bnrecal')]]) + ' |')
    return '\n'.join(lines)


def write_results(args: argparse.Namespace, timings: Dict[str, float], wall: float, command: str) -> str:
    from timm_stim.loafing_report import plot_loafing
    rows, per_run = collect(args)
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    fields = ['run', 'label', 'seed', 'depths', 'keep', 'is_full', 'rel_depth', 'rel_flops', 'top1', 'top5',
              'top1_bnrecal', 'top5_bnrecal', 'bn_recal_images', 'num_val']
    with (results / f'{args.name}.csv').open('w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction='ignore')
        writer.writeheader()
        writer.writerows(rows)
    runs = grid(args)
    k_max, lr_hi = max(args.ks), args.short_lr_factor
    plotted = ['base', f'ft-plain-k{k_max}-lr{lr_hi:g}', f'ft-st-k{k_max}-lr{lr_hi:g}', 'scratch-st']
    plot_loafing(_mean_rows([r for r in rows if r['run'] in plotted], by='run'), results / f'{args.name}.png',
                 title=f'ST as a fine-tune, digits, {display(args)}: every ST subnet, top-1 over {len(args.seeds)} '
                       f'seeds')
    subnets = [r for r in rows if not r['is_full']]
    n_sub = len({r['depths'] for r in subnets})
    rel_flops = statistics.fmean(r['rel_flops'] for r in subnets)
    example = '\n'.join(' '.join(shlex.quote(w) for w in train_command(args, r, 0)) for r in
                        [runs[0], *[r for r in runs if r.key.startswith('ft-') and r.epochs == k_max
                                    and f'lr{lr_hi:g}' in r.key], runs[-1]])
    check = max(abs(a - _final_top1(_run_dir(args, r, seed))) for r in runs
                for seed, a in zip(args.seeds, per_run[r.key]['full_top1']))
    train_s = sum(v for k, v in timings.items() if not k.startswith('loafing'))
    loaf_s = sum(v for k, v in timings.items() if k.startswith('loafing'))
    model_line = (f'timm `{args.model}` with `--model-kwargs {" ".join(args.model_kwargs)}`' if args.model
                  else f'timm `{_recipe(args).get("model")}`')
    extra = f' plus `{args.train_flags}`' if args.train_flags else ''
    lr0 = base_lr(args)
    md = f"""# Stimulative Training as a short fine-tune on digits ({display(args)})

Can a plain model that is already trained be made elastic (good residual subnets) by a short ST fine-tune, and
how does that compare with a plain fine-tune of the same length and with ST from scratch? Issue 21's evidence
experiment; measured with `timm_stim.loafing`. Hand-written sections after the command (other settings, the
goals in plain words, the recommended defaults) follow the generated tables.

## Setup
- Data: the embedded scikit-learn digits (1438 train / 359 validation images, 8x8 upsampled to 32 px,
  10 classes). One validation image is 0.28 % top-1.
- Model: {display(args)} ({model_line}, 10 classes).
- Recipe: `{os.path.relpath(args.config, REPO)}`{extra} (from-scratch lr {lr0:g}); seeds
  {', '.join(map(str, args.seeds))}. Per seed: a plain base trained N = {args.epochs} epochs; from its
  `last.pth.tar` (`--initial-checkpoint`) fine-tunes of k epochs with `--lr` = factor x {lr0:g} and
  `--warmup-epochs 0` (cosine to zero over the k epochs, optimizer state new); ST from scratch for N epochs.
  train_stim.py defaults otherwise: one subnet per step (M = 1), `--stim-weight` 1, `--stim-bn freeze`; ST++
  fine-tunes pinned to full-size subnet inputs (`--stim-min-scale 1`, what the preset does at 32 px anyway).
- Evaluation: the `last` checkpoint of every run; the full net and all {n_sub} other depth vectors of the ST
  space measured on the validation split ({n_sub} subnets, mean relative FLOPs {rel_flops:.3f}), the same for every
  model. "BN re-est." = BatchNorm statistics re-estimated per subnet on {args.bn_recal} training images (fixed per
  seed); otherwise the statistics stored in the checkpoint ("as trained"). Cross-check: the full-net top-1
  measured here matches each training log's final eval top-1 within {check:.2f} points.
- Machine: the project's 2-core CPU machine, shared with other agents' jobs (loaded: load average 6-8
  when sampled during the runs); every training alone, one thread.

## Results (top-1 %, mean ± std over {len(args.seeds)} seeds; subnet columns exclude the full net)

{main_table(args, per_run, timings)}

"train wall s": mean wall seconds of that training (fine-tunes: the fine-tune only), one thread on the loaded
machine. An ST / ST++ step also runs one subnet forward and backward, so its epochs cost more than a plain one.

![subnet top-1 vs relative FLOPs]({args.name}.png)

## Against the issue's goals (paired over seeds: each fine-tune and its control start from the same base)

Differences are means of the per-seed differences ± their standard error. "Plain fine-tune" = the plain
fine-tune with the same k and lr.

{goals_table(args, per_run)}

What the extra epochs do, against the base (paired, same columns):

{reference_table(args, per_run)}

Per-subnet numbers of every run: `{args.name}.csv`. Per-seed loafing reports:
`{os.path.relpath(args.work_dir, REPO)}/loafing/seed*/`.

## How this was produced
```
{command}
```
which runs, per seed (seed 0 shown; the other lr factors and k are the same commands with `--lr` / `--epochs`
changed), one at a time with OMP_NUM_THREADS=1:
```
{example}
python -m timm_stim.loafing <the {len(runs)} run folders> --checkpoint last --subnets {args.subnets} --space st \\
    --bn-recal {args.bn_recal} --seed 0 --device cpu
```
Wall time {wall / 60:.1f} min in total (trainings {train_s / 60:.1f} min summed, loafing evaluation
{loaf_s / 60:.1f} min summed over seeds).
"""
    path = results / f'{args.name}.md'
    if path.is_file() and HAND_MARK in path.read_text():
        md += '\n' + HAND_MARK + path.read_text().split(HAND_MARK, 1)[1]
    path.write_text(md)
    return main_table(args, per_run, timings) + '\n\n' + goals_table(args, per_run)


def main(argv: Sequence[str] = None) -> int:
    args = parse_args(argv)
    timing_file = Path(args.work_dir) / 'timings.json'
    saved = json.loads(timing_file.read_text()) if timing_file.is_file() else dict(timings={}, wall=0.0, command='')
    if args.report_only:
        timings, wall, command = saved['timings'], saved['wall'], saved['command']
    else:
        given = argv if argv is not None else sys.argv[1:]
        command = 'python ' + shlex.join([os.path.relpath(__file__, REPO), *given])
        if saved['command'] and command not in saved['command'].split('\n'):
            command = f"{saved['command']}\n{command}"
        timings, start, wall0 = dict(saved['timings']), time.time(), saved['wall']

        def save() -> None:
            timing_file.parent.mkdir(parents=True, exist_ok=True)
            timing_file.write_text(json.dumps(dict(timings=timings, wall=wall0 + time.time() - start,
                                                   command=command), indent=2))

        run_all(args, timings, save)
        save()
        wall = wall0 + time.time() - start
    table = write_results(args, timings, wall, command)
    print(table)
    print(f'\nwall time {wall / 60:.1f} min; wrote {args.results_dir}/{args.name}.md, .csv, .png')
    return 0


if __name__ == '__main__':
    sys.exit(main())
