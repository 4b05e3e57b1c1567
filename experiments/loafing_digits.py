"""Evidence experiment: does Stimulative Training reduce network loafing? (digits, ResNet-18, CPU)

Trains four variants with the same recipe (hparams/digits_resnet18.yaml) on the embedded scikit-learn
digits, for several seeds:

    baseline        --stim none
    st              --stim st                         (uniform depth, KL)
    st++            --stim st++                       (inter-stage rule, KL-, smaller subnet inputs)
    st++ full-size  --stim st++ --stim-min-scale 1    (ST++ without the smaller inputs)

then measures every subnet of ResNet-18's ST space (16 depth vectors, full net included) of each final
model with `python -m timm_stim.loafing`, with and without per-subnet BN re-estimation, and writes
docs/results/loafing_digits.md (table: mean +- std over seeds), .csv (every subnet of every run) and .png.

    python experiments/loafing_digits.py                      # the full run (about 30 min on 2 CPU cores)
    python experiments/loafing_digits.py --seeds 0 --epochs 2 --results-dir /tmp/quick   # smoke run
    python experiments/loafing_digits.py --report-only        # rewrite docs/results from finished runs

Finished trainings (summary.csv with every epoch and last.pth.tar present) are not retrained, so an
interrupted run can be restarted with the same command.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name -> (folder-safe key, train_stim.py flags)
VARIANTS: Dict[str, Tuple[str, List[str]]] = {
    'baseline': ('baseline', ['--stim', 'none']),
    'st': ('st', ['--stim', 'st']),
    'st++': ('stpp', ['--stim', 'st++']),
    'st++ full-size': ('stpp-fullsize', ['--stim', 'st++', '--stim-min-scale', '1']),
}
# The slowest runs first, so the two parallel workers finish together.
_ORDER = ('st', 'st++ full-size', 'st++', 'baseline')


def parse_args(argv: Sequence[str] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--epochs', type=int, default=10, help='training epochs of every run')
    parser.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument('--config', default=str(REPO / 'hparams' / 'digits_resnet18.yaml'))
    parser.add_argument('--parallel', type=int, default=2, help='trainings run at once (one thread each)')
    parser.add_argument('--bn-recal', type=int, default=500, help='training images per subnet BN re-estimation')
    parser.add_argument('--checkpoint', default='last', help="'last' (default: no selection on the val split) or 'best'")
    parser.add_argument('--work-dir', default=str(REPO / 'output' / 'loafing_digits'))
    parser.add_argument('--results-dir', default=str(REPO / 'docs' / 'results'))
    parser.add_argument('--retrain', action='store_true', help='retrain even if a finished run exists')
    parser.add_argument('--report-only', action='store_true',
                        help='only rewrite the results from the finished runs and loafing reports (and saved timings)')
    return parser.parse_args(argv)


def _env() -> Dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', HF_HUB_OFFLINE='1')
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(REPO), env.get('PYTHONPATH', '')]))
    return env


def _run_dir(args: argparse.Namespace, variant: str, seed: int) -> Path:
    return Path(args.work_dir) / 'train' / f'{VARIANTS[variant][0]}-s{seed}'


def _finished(run_dir: Path, epochs: int) -> bool:
    summary = run_dir / 'summary.csv'
    if not (summary.is_file() and (run_dir / 'last.pth.tar').is_file()):
        return False
    with summary.open(newline='') as f:
        return len(list(csv.DictReader(f))) >= epochs


def _train_command(args: argparse.Namespace, variant: str, seed: int) -> List[str]:
    run_dir = _run_dir(args, variant, seed)
    return [sys.executable, str(REPO / 'train_stim.py'), '-c', args.config, *VARIANTS[variant][1],
            '--seed', str(seed), '--epochs', str(args.epochs), '--checkpoint-hist', '1',
            '--output', str(run_dir.parent), '--experiment', run_dir.name]


def _run_job(name: str, command: List[str], log: Path) -> Tuple[str, int, float]:
    """Run one subprocess with its output in `log`; returns (name, return code, seconds)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with log.open('w') as f:
        f.write(' '.join(command) + '\n\n')
        f.flush()
        rc = subprocess.call(command, stdout=f, stderr=subprocess.STDOUT, env=_env(), cwd=str(REPO))
    seconds = time.time() - start
    print(f'  {"done" if rc == 0 else "FAILED"} {name} in {seconds:.0f} s (rc {rc}, log {log})', flush=True)
    return name, rc, seconds


def _run_all(jobs: List[Tuple[str, List[str], Path]], parallel: int) -> Dict[str, float]:
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        outcomes = list(pool.map(lambda job: _run_job(*job), jobs))
    failed = [name for name, rc, _ in outcomes if rc != 0]
    if failed:
        raise SystemExit(f'failed: {", ".join(failed)}; see the logs')
    return {name: seconds for name, _, seconds in outcomes}


def train_all(args: argparse.Namespace) -> Dict[str, float]:
    """Train every (variant, seed) not finished yet; returns wall seconds per run trained now."""
    jobs = []
    for variant in sorted(args.variants, key=_ORDER.index):
        for seed in args.seeds:
            run_dir = _run_dir(args, variant, seed)
            if not args.retrain and _finished(run_dir, args.epochs):
                print(f'  skip {run_dir.name}: finished run exists', flush=True)
                continue
            jobs.append((run_dir.name, _train_command(args, variant, seed), run_dir.parent / f'{run_dir.name}.log'))
    print(f'training {len(jobs)} runs, {args.parallel} at a time', flush=True)
    return _run_all(jobs, args.parallel)


def loafing_all(args: argparse.Namespace) -> Dict[str, float]:
    """One `python -m timm_stim.loafing` per seed over all variants (all ST subnets, BN re-estimation)."""
    jobs = []
    for seed in args.seeds:
        out = Path(args.work_dir) / 'loafing' / f'seed{seed}'
        command = [sys.executable, '-m', 'timm_stim.loafing',
                   *[str(_run_dir(args, v, seed)) for v in args.variants],
                   '--labels', *[VARIANTS[v][0] for v in args.variants], '--checkpoint', args.checkpoint,
                   '--subnets', 'all', '--space', 'st', '--bn-recal', str(args.bn_recal), '--seed', str(seed),
                   '-j', '0', '-b', '128', '--device', 'cpu', '--output', str(out),
                   '--title', f'Network loafing on digits, ResNet-18, seed {seed}']
        jobs.append((f'loafing seed {seed}', command, out.parent / f'seed{seed}.log'))
    print(f'loafing evaluation of {len(jobs)} seeds', flush=True)
    return _run_all(jobs, args.parallel)


# ----------------------------------------------------------------------------------------------- aggregation


def _mean_std(values: List[float]) -> Tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float('nan'))


def _final_train_top1(run_dir: Path, checkpoint: str) -> float:
    """Top-1 the training script logged for the evaluated checkpoint (cross-check of the loafing full net)."""
    with (run_dir / 'summary.csv').open(newline='') as f:
        top1 = [float(r['eval_top1']) for r in csv.DictReader(f)]
    return max(top1) if checkpoint == 'best' else top1[-1]


def collect(args: argparse.Namespace) -> Tuple[List[Dict[str, Any]], Dict[str, Dict[str, List[float]]]]:
    """Every subnet row of every run (with variant and seed) and, per variant, the per-seed summary metrics."""
    key_to_variant = {VARIANTS[v][0]: v for v in args.variants}
    rows, per_variant = [], {v: {} for v in args.variants}
    for seed in args.seeds:
        payload = json.loads((Path(args.work_dir) / 'loafing' / f'seed{seed}' / 'loafing.json').read_text())
        for r in payload['results']:
            rows.append(dict(variant=key_to_variant[r['model']], seed=seed, **r))
        for s in payload['summary']:
            variant = key_to_variant[s['model']]
            metrics = dict(s, loafing_gap=s['full_top1'] - s['mean_top1'],
                           loafing_gap_bnrecal=s['full_top1_bnrecal'] - s['mean_top1_bnrecal'],
                           train_top1=_final_train_top1(_run_dir(args, variant, seed), args.checkpoint))
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    per_variant[variant].setdefault(key, []).append(float(value))
    return rows, per_variant


_COLUMNS = (
    ('full_top1', 'full net'), ('mean_top1', 'mean subnet'), ('min_top1', 'min subnet'),
    ('loafing_gap', 'full - mean subnet'),
    ('full_top1_bnrecal', 'full net, BN re-est.'), ('mean_top1_bnrecal', 'mean subnet, BN re-est.'),
    ('min_top1_bnrecal', 'min subnet, BN re-est.'), ('loafing_gap_bnrecal', 'full - mean subnet, BN re-est.'),
)


def _pm(values: List[float]) -> str:
    mean, std = _mean_std(values)
    return f'{mean:.2f} ± {std:.2f}' if math.isfinite(std) else f'{mean:.2f}'


def _delta(values: List[float], base: List[float]) -> str:
    """Difference of means to the baseline and its standard error (unpaired, over seeds)."""
    diff = statistics.fmean(values) - statistics.fmean(base)
    if len(values) < 2 or len(base) < 2:
        return f'{diff:+.2f}'
    se = math.sqrt(statistics.variance(values) / len(values) + statistics.variance(base) / len(base))
    return f'{diff:+.2f} ± {se:.2f}'


def markdown_table(per_variant: Dict[str, Dict[str, List[float]]]) -> str:
    header = ['variant'] + [label for _, label in _COLUMNS]
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join(['---'] + ['---:'] * len(_COLUMNS)) + '|']
    for variant, metrics in per_variant.items():
        lines.append('| ' + ' | '.join([variant] + [_pm(metrics[k]) for k, _ in _COLUMNS]) + ' |')
    base = per_variant.get('baseline')
    if base:
        lines += ['', 'Difference to the baseline (difference of seed means ± its standard error):', '',
                  '| variant | full net | mean subnet | min subnet | full net, BN re-est. | mean subnet, BN re-est. '
                  '| min subnet, BN re-est. |', '|---|---:|---:|---:|---:|---:|---:|']
        keys = ('full_top1', 'mean_top1', 'min_top1', 'full_top1_bnrecal', 'mean_top1_bnrecal', 'min_top1_bnrecal')
        for variant, metrics in per_variant.items():
            if variant != 'baseline':
                lines.append('| ' + ' | '.join([variant] + [_delta(metrics[k], base[k]) for k in keys]) + ' |')
    return '\n'.join(lines)


def space_breakdown(rows: List[Dict[str, Any]], variants: Sequence[str]) -> str:
    """Mean subnet top-1 inside vs outside the ST++ space (the only subnets ST++ trains), mean ± std over seeds."""
    import timm
    from timm_stim import find_residual_blocks
    from timm_stim.loafing import make_subnet_specs
    layout = find_residual_blocks(timm.create_model('resnet18', num_classes=10), input_size=(3, 32, 32))
    staged, specs = make_subnet_specs(layout, 'all', space='st++')
    inside = {','.join(map(str, staged.depths(s))) for s in specs}
    lines = [f"| variant | inside ST++ space ({len(inside) - 1} subnets) | outside ({{n_out}} subnets) "
             f"| inside, BN re-est. | outside, BN re-est. |", '|---|---:|---:|---:|---:|']
    n_out = 0
    for variant in variants:
        cells = []
        for key in ('top1', 'top1_bnrecal'):
            for want in (True, False):
                per_seed: Dict[int, List[float]] = {}
                for r in rows:
                    if r['variant'] == variant and not r['is_full'] and (r['depths'] in inside) == want:
                        per_seed.setdefault(r['seed'], []).append(r[key])
                n_out = n_out if want else len(next(iter(per_seed.values())))
                cells.append(_pm([statistics.fmean(v) for v in per_seed.values()]))
        lines.append('| ' + ' | '.join([variant, cells[0], cells[1], cells[2], cells[3]]) + ' |')
    lines[0] = lines[0].replace('{n_out}', str(n_out))
    return '\n'.join(lines)


def _mean_rows(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per variant and depth vector, accuracies averaged over seeds (for the plot)."""
    groups: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r['variant'], r['depths']), []).append(r)
    out = []
    for (variant, _), group in groups.items():
        mean = dict(group[0], model=f'{variant} ({len(group)} seeds)')
        for key in ('top1', 'top5', 'top1_bnrecal', 'top5_bnrecal'):
            mean[key] = statistics.fmean(g[key] for g in group)
        out.append(mean)
    return out


def write_results(args: argparse.Namespace, timings: Dict[str, float], wall: float, command: str) -> str:
    from timm_stim.loafing import plot_loafing
    rows, per_variant = collect(args)
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    fields = ['variant', 'seed', 'depths', 'keep', 'is_full', 'rel_depth', 'rel_flops', 'top1', 'top5',
              'top1_bnrecal', 'top5_bnrecal', 'bn_recal_images', 'num_val']
    with (results / 'loafing_digits.csv').open('w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction='ignore')
        writer.writeheader()
        writer.writerows(rows)
    seeds = len(args.seeds)
    plot_loafing(_mean_rows(rows), results / 'loafing_digits.png',
                 title=f'Network loafing on digits, ResNet-18: every ST subnet, top-1 averaged over {seeds} seeds')

    table = markdown_table(per_variant)
    breakdown = space_breakdown(rows, list(per_variant))
    subnets = [r for r in rows if not r['is_full']]
    n_sub = len({r['depths'] for r in subnets})
    rel_flops = statistics.fmean(r['rel_flops'] for r in subnets) if subnets else float('nan')
    check = max(abs(a - b) for m in per_variant.values() for a, b in zip(m['full_top1'], m['train_top1']))
    train_s = sum(v for k, v in timings.items() if not k.startswith('loafing'))
    trained = sum(not k.startswith('loafing') for k in timings)
    reused = len(args.variants) * seeds - trained
    per_variant_time = ', '.join(
        f'{v} {statistics.fmean(t):.0f} s' for v in args.variants
        if (t := [timings[k] for k in timings if k.rsplit('-s', 1)[0] == VARIANTS[v][0]]))
    reuse_note = f' {reused} finished runs were reused from an earlier invocation (not in these times).' if reused else ''
    md = f"""# Network loafing on digits (ResNet-18): baseline vs ST vs ST++

Does Stimulative Training make the residual subnetworks inside a network better (less "loafing"), and the
full network with them? Measured with `timm_stim.loafing` (METHOD.md, "Network loafing: how to measure it").

## Setup
- Data: the embedded scikit-learn digits (1438 train / 359 validation images, 8x8 upsampled to 32 px,
  10 classes). One validation image is 0.28 % top-1.
- Recipe: `{os.path.relpath(args.config, REPO)}` (SGD, cosine, label smoothing 0.1) with `--epochs {args.epochs}`, the
  same for every variant; seeds {', '.join(map(str, args.seeds))}. Variants: `baseline` = `--stim none`,
  `st` = `--stim st`, `st++` = `--stim st++`, `st++ full-size` = `--stim st++ --stim-min-scale 1`
  (ST++ without the smaller subnet inputs). One subnet per step (M = 1), train_stim.py defaults otherwise.
- Evaluation: the `{args.checkpoint}` checkpoint of each run (no selection on the validation split);
  all {n_sub + 1} depth vectors of ResNet-18's ST space (2/2/2/2 blocks; layer1 may drop one block, the other
  stages their second block), i.e. {n_sub} subnets besides the full net, mean relative FLOPs {rel_flops:.3f}
  (counted with FlopCounterMode at 32 px). "BN re-est." = BatchNorm statistics re-estimated for each subnet on
  {args.bn_recal} training images (eval transforms, fixed per seed), on a copy of the model.
- Cross-check: the full-net top-1 measured here matches the training log's final eval top-1 within {check:.2f} points.

## Results (top-1 %, mean ± std over {seeds} seeds; "subnet" columns exclude the full net)

{table}

![subnet top-1 vs relative FLOPs](loafing_digits.png)

ST++ (`--stim st++`) trains only the subnets of its own space (on ResNet-18: layer1 and layer4 always full,
layer2 and/or layer3 may drop their second block); the table above measures all ST-space subnets. Mean subnet
top-1 inside vs outside the ST++ space (mean ± std over seeds):

{breakdown}

## Caveats
- Not compute-matched: an ST / ST++ step also runs one subnet forward and backward, so these runs cost
  more per epoch than the baseline (compare the training times in the logs); all variants get the same epochs.
- The task is close to saturation (full nets near 99 %), so full-net differences are a few validation images.
- {seeds} seeds only: "±" in the first table is the sample std over seeds, in the difference table the standard
  error of the difference of means (unpaired); neither is a significance test.

Per-subnet numbers of every run: `loafing_digits.csv`. Per-seed reports (csv/json/png):
`{os.path.relpath(args.work_dir, REPO)}/loafing/seed*/`.

## How this was produced
```
{command}
```
Wall time {wall / 60:.1f} min in total on a shared 2-core CPU machine (trainings {args.parallel} at a time with one
thread each; sum of training wall times {train_s / 60:.1f} min, loafing evaluation
{sum(v for k, v in timings.items() if k.startswith('loafing')) / 60:.1f} min summed over seeds).{reuse_note}
Mean training wall time per run (2 at once on a machine shared with other jobs, so only roughly comparable):
{per_variant_time}.
"""
    (results / 'loafing_digits.md').write_text(md)
    return table


def main(argv: Sequence[str] = None) -> int:
    args = parse_args(argv)
    timing_file = Path(args.work_dir) / 'timings.json'
    if args.report_only:
        saved = json.loads(timing_file.read_text())
        timings, wall, command = saved['timings'], saved['wall'], saved['command']
    else:
        command = 'python ' + ' '.join([os.path.relpath(__file__, REPO), *(argv if argv is not None else sys.argv[1:])])
        start = time.time()
        timings = train_all(args)
        timings.update(loafing_all(args))
        wall = time.time() - start
        timing_file.write_text(json.dumps(dict(timings=timings, wall=wall, command=command), indent=2))
    table = write_results(args, timings, wall, command)
    print(table)
    print(f'\nwall time {wall / 60:.1f} min; wrote {args.results_dir}/loafing_digits.md, .csv, .png')
    return 0


if __name__ == '__main__':
    sys.exit(main())
