"""Evidence for subnet export on digits: is an exported subnet as good as a model of that depth trained alone?

For each seed and each chosen depth of ResNet-18's ST space this compares, on the validation split (top-1 %):
    ST export        `python -m timm_stim.export <st run> --depths D`       (trained with --stim st)
    ST++ export      the same on a `--stim st++` run (the 32 px preset: no smaller subnet inputs)
    ST++ 13-32 px    the same on `--stim st++ --stim-min-scale 0.43` (subnet inputs 13-32 px, the older preset)
    baseline subnet  the same on a `--stim none` run (the subnet was never trained on its own)
    from scratch     `train_stim.py --model-kwargs layers=[D]`: a plain ResNet of that depth, same recipe
Exports are measured twice: with the BatchNorm statistics as trained, and with `--bn-recal N` (statistics
re-estimated for the subnet on N training images). From-scratch models are evaluated as trained (their own
statistics): the final eval top-1 of their summary.csv, i.e. the `last` checkpoint.

The script only drives `train_stim.py` and `python -m timm_stim.export` command lines. It is restartable:
finished trainings (summary.csv with every epoch and last.pth.tar) and finished exports (subnets.csv) are reused,
so runs of another experiment with the same recipe can be shared through `--reuse-dir`.

    python experiments/export_evidence.py                                  # everything, docs/results/export_digits.*
    python experiments/export_evidence.py --seeds 0 --epochs 1 --results-dir /tmp/quick   # smoke run
"""
import argparse
import csv
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from loafing_digits import finished_run  # noqa: E402  (the same restart rule as the loafing experiment)

# model kind -> (folder key, train_stim.py flags); exports are taken from these runs
# (ST++ min scale given explicitly: its preset at 32 px is 1 today, and was 0.43 when older runs were trained)
STIM_RUNS = {
    'ST export': ('st', ['--stim', 'st']),
    # the authors' main loss pinned (train_stim.py uses raw logits under 200 epochs since these runs)
    'ST++ export': ('stpp-fullsize', ['--stim', 'st++', '--stim-min-scale', '1', '--stim-main-logits',
                                      'standardized']),
    'ST++ 13-32 px export': ('stpp', ['--stim', 'st++', '--stim-min-scale', '0.43', '--stim-main-logits',
                                      'standardized']),
    'baseline subnet': ('baseline', ['--stim', 'none']),
}
SCRATCH = 'from scratch'
MODES = ('as trained', 'BN re-est.')
BUSY_SECONDS = 300  # a job whose log changed this recently is left to the invocation running it
FULL = 'full'  # the parent model itself (context row of the table)


def parse_args(argv: Sequence[str] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--depths', nargs='+', default=['1,1,1,1', '2,1,1,2'], help='ResNet-18 blocks per stage')
    parser.add_argument('--epochs', type=int, default=3, help='training epochs of every run')
    parser.add_argument('--config', default=str(REPO / 'hparams' / 'digits_resnet18.yaml'))
    parser.add_argument('--bn-recal', type=int, default=500, help='training images per subnet BN re-estimation')
    parser.add_argument('--latency-repeats', type=int, default=5, help='timed CPU forwards per batch size (export)')
    parser.add_argument('--parallel', type=int, default=2, help='processes run at once (one thread each)')
    parser.add_argument('--work-dir', default=str(REPO / 'output' / 'export_digits'))
    parser.add_argument('--reuse-dir', default=None,
                        help='folder of finished train_stim.py runs named <key>-s<seed> (e.g. loafing_digits.py '
                             'work-dir/train) used before training anew')
    parser.add_argument('--results-dir', default=str(REPO / 'docs' / 'results'))
    parser.add_argument('--name', default='export_digits', help='results file name: <results-dir>/<name>.md/.csv')
    parser.add_argument('--report-only', action='store_true', help='only aggregate finished runs and exports')
    parser.add_argument('--exports-only', action='store_true',
                        help='train nothing; export the runs that are finished (e.g. while others still train)')
    return parser.parse_args(argv)


def _env() -> Dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', HF_HUB_OFFLINE='1')
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(REPO), env.get('PYTHONPATH', '')]))
    return env


def _scratch_key(depths: str) -> str:
    return 'scratch-' + depths.replace(',', '')


def _run_dir(args: argparse.Namespace, key: str, seed: int) -> Path:
    """A finished run under --reuse-dir if there is one, else this experiment's own folder."""
    if args.reuse_dir:
        reused = Path(args.reuse_dir) / f'{key}-s{seed}'
        if finished_run(reused, args.epochs):
            return reused
    return Path(args.work_dir) / 'train' / f'{key}-s{seed}'


def _trainings(args: argparse.Namespace) -> List[Tuple[Path, List[str]]]:
    """(run folder, train_stim.py command) of every run the table needs; longest (ST) first."""
    jobs = []
    specs = [(key, flags) for key, flags in STIM_RUNS.values()]
    specs += [(_scratch_key(d), ['--stim', 'none', '--model-kwargs', f'layers=[{d}]']) for d in args.depths]
    for key, flags in specs:
        for seed in args.seeds:
            run_dir = _run_dir(args, key, seed)
            cmd = [sys.executable, str(REPO / 'train_stim.py'), '-c', args.config, *flags, '--seed', str(seed),
                   '--epochs', str(args.epochs), '--checkpoint-hist', '1',
                   '--output', str(run_dir.parent), '--experiment', run_dir.name]
            jobs.append((run_dir, cmd))
    return jobs


def _export_dir(args: argparse.Namespace, key: str, seed: int, mode: str) -> Path:
    suffix = f'bnrecal{args.bn_recal}' if mode == 'BN re-est.' else 'astrained'
    return Path(args.work_dir) / 'export' / f'{key}-s{seed}-{suffix}'


def _exports(args: argparse.Namespace) -> List[Tuple[Path, List[str]]]:
    jobs = []
    for key, _ in reversed(STIM_RUNS.values()):  # this experiment's own trainings (ST) last: they finish last
        for seed in args.seeds:
            if not finished_run(_run_dir(args, key, seed), args.epochs):
                continue
            for mode in MODES:
                out = _export_dir(args, key, seed, mode)
                cmd = [sys.executable, '-m', 'timm_stim.export', str(_run_dir(args, key, seed)),
                       '--depths', *args.depths, '--checkpoint', 'last', '--seed', str(seed), '--device', 'cpu',
                       '-j', '0', '-b', '128', '--latency-repeats', str(args.latency_repeats), '--output', str(out),
                       *(['--bn-recal', str(args.bn_recal)] if mode == 'BN re-est.' else [])]
                jobs.append((out, cmd))
    return jobs


def _run(job: Tuple[Path, List[str]], log: Path, timings: Dict[str, float]) -> None:
    target, cmd = job
    if log.is_file() and time.time() - log.stat().st_mtime < BUSY_SECONDS:
        print(f'skip {target.name}: its log was written in the last {BUSY_SECONDS} s (another invocation runs it)')
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f'[{datetime.datetime.utcnow():%H:%M:%S}] start {target.name}', flush=True)
    start = time.time()
    with log.open('w') as f:
        f.write(' '.join(cmd) + '\n')
        f.flush()
        rc = subprocess.call(['nice', '-n', '19', *cmd], stdout=f, stderr=subprocess.STDOUT, env=_env(), cwd=REPO)
    timings[target.name] = time.time() - start
    print(f'[{datetime.datetime.utcnow():%H:%M:%S}] {"done" if rc == 0 else f"FAILED rc={rc}"} {target.name} '
          f'({timings[target.name]:.0f} s, log {log})', flush=True)


def _run_all(jobs: List[Tuple[Path, List[str]]], logs: Path, parallel: int, timings: Dict[str, float]) -> None:
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        list(pool.map(lambda job: _run(job, logs / f'{job[0].name}.log', timings), jobs))


# ----------------------------------------------------------------------------------------------- aggregation

def _read_csv(path: Path) -> List[Dict[str, str]]:
    with path.open(newline='') as f:
        return list(csv.DictReader(f))


def _export_top1(out: Path, depths: str) -> Optional[float]:
    """Top-1 of the subnet `depths` ('full': the parent model) in an export's subnets.csv."""
    if not (out / 'subnets.csv').is_file():
        return None
    for row in _read_csv(out / 'subnets.csv'):
        match = row['is_full'] == 'True' if depths == FULL else row['depths'] == depths
        if match and row['top1']:
            return float(row['top1'])
    return None


def _scratch_top1(run_dir: Path, epochs: int) -> Optional[float]:
    if not finished_run(run_dir, epochs):
        return None
    return float(_read_csv(run_dir / 'summary.csv')[-1]['eval_top1'])


def collect(args: argparse.Namespace) -> List[Dict[str, object]]:
    """One row per (depth, model kind, mode, seed) with the measured top-1 (None when not finished)."""
    rows = []
    for depths in [*args.depths, FULL]:
        for kind, (key, _) in STIM_RUNS.items():
            for mode in MODES:
                for seed in args.seeds:
                    rows.append(dict(depths=depths, model=kind, bn=mode, seed=seed,
                                     top1=_export_top1(_export_dir(args, key, seed, mode), depths)))
        for seed in args.seeds if depths != FULL else []:
            rows.append(dict(depths=depths, model=SCRATCH, bn='as trained', seed=seed,
                             top1=_scratch_top1(_run_dir(args, _scratch_key(depths), seed), args.epochs)))
    return rows


def _mean_std(values: List[float]) -> str:
    if not values:
        return 'n/a'
    if len(values) == 1:
        return f'{values[0]:.2f} (n=1)'
    return f'{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}' + (f' (n={len(values)})'
                                                                               if len(values) < 3 else '')


def table(args: argparse.Namespace, rows: List[Dict[str, object]]) -> str:
    """Markdown table: one line per (model, BN statistics), one column per depth; mean ± std over seeds."""
    depths = [*args.depths, FULL]
    header = ['model', 'BN statistics', *depths]
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join(['---', '---'] + ['---:'] * len(depths)) + '|']
    for kind, mode in [(kind, mode) for kind in STIM_RUNS for mode in MODES] + [(SCRATCH, 'as trained')]:
        cells = [kind, mode]
        for d in depths:
            values = [r['top1'] for r in rows if (r['depths'], r['model'], r['bn']) == (d, kind, mode)
                      and r['top1'] is not None]
            cells.append('—' if kind == SCRATCH and d == FULL else _mean_std(values))
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def write_csv(path: Path, rows: List[Dict[str, object]]) -> None:
    with path.open('w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=['depths', 'model', 'bn', 'seed', 'top1'])
        writer.writeheader()
        writer.writerows(rows)


def main(argv: Sequence[str] = None) -> int:
    args = parse_args(argv)
    work = Path(args.work_dir)
    timings: Dict[str, float] = {}
    start = time.time()
    if not args.report_only:
        if not args.exports_only:
            todo = [job for job in _trainings(args) if not finished_run(job[0], args.epochs)]
            _run_all(todo, work / 'logs', args.parallel, timings)
        todo = [job for job in _exports(args) if not (job[0] / 'subnets.csv').is_file()]
        _run_all(todo, work / 'logs', args.parallel, timings)
    rows = collect(args)
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    write_csv(results / f'{args.name}.csv', rows)
    print(table(args, rows))
    if timings:
        print(f'wall {time.time() - start:.0f} s; per job (s): '
              + ', '.join(f'{k} {v:.0f}' for k, v in timings.items()), flush=True)
    print(f'machine: {platform.platform()}, {os.cpu_count()} CPUs; rows: {results / args.name}.csv')
    return 0


if __name__ == '__main__':
    sys.exit(main())
