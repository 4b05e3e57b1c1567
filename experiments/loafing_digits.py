"""Evidence experiment: does Stimulative Training reduce network loafing? (digits, ResNet-18 by default, CPU)

Trains variants with the same recipe (hparams/digits_resnet18.yaml; `--model NAME` swaps in another timm
model, default: the recipe's) on the embedded scikit-learn digits, for several seeds (default: the first four):

    baseline          --stim none
    st                --stim st                         (uniform depth, KL)
    st++              --stim st++                       (inter-stage rule, KL-, smaller subnet inputs)
    st++ full-size    --stim st++ --stim-min-scale 1    (ST++ without the smaller inputs)
    st++ min 0.75     --stim st++ --stim-min-scale 0.75 (smaller inputs, narrower range)
    st++ raw main     --stim st++ --stim-min-scale 1 --stim-main-logits raw
                      (ST++ without smaller inputs, main loss on raw logits as in ST and timm; KL- subnet loss)
    st++ raw main 0.43  the same with the authors' smaller inputs (--stim-min-scale 0.43)
    st++ authors      --stim st++ --stim-bn update --stim-bn-recal 2000
                      (subnet passes update BN running stats; re-estimated on 2000 training images before
                      every validation, so the checkpoint carries re-estimated full-net statistics)

then measures every subnet of the model's ST space (ResNet-18: 16 depth vectors, full net included) of each
final model with `python -m timm_stim.loafing`, with and without per-subnet BN re-estimation, and writes
docs/results/<name>.md (table: mean +- std over seeds), .csv (every subnet of every run) and .png.
`--eval-sizes` adds the same measurement at other image sizes (e.g. the sizes ST++ subnets were trained at).

    python experiments/loafing_digits.py                      # the full run (about 30 min on 2 CPU cores)
    python experiments/loafing_digits.py --seeds 0 --epochs 2 --results-dir /tmp/quick   # smoke run
    python experiments/loafing_digits.py --report-only        # rewrite docs/results from finished runs
    # ST++ at low resolution (docs/results/stpp_lowres_32px.md; 64 px: --img-size 64 and the name _64px):
    python experiments/loafing_digits.py --variants all --eval-sizes 16 24 --name stpp_lowres_32px \
        --work-dir output/stpp_lowres_32px
    # the same on ResNet-34 (3/4/6/3 blocks: 216 ST depth vectors); the report's text follows the model's layout:
    python experiments/loafing_digits.py --model resnet34 --variants baseline st st++ 'st++ full-size' --epochs 3 \
        --name stpp_lowres_32px_resnet34 --work-dir output/stpp_lowres_32px_resnet34

Finished trainings (summary.csv with every epoch and last.pth.tar present) are not retrained, so an
interrupted run can be restarted with the same command.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shlex
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
    # the authors' smaller-input range and main loss, pinned: since these runs the st++ preset turns smaller inputs
    # off below 64 px, and train_stim.py puts the main loss on raw logits on schedules under 200 epochs
    'st++': ('stpp', ['--stim', 'st++', '--stim-min-scale', '0.43', '--stim-main-logits', 'standardized']),
    'st++ full-size': ('stpp-fullsize', ['--stim', 'st++', '--stim-min-scale', '1', '--stim-main-logits',
                                         'standardized']),
    'st++ min 0.75': ('stpp-min075', ['--stim', 'st++', '--stim-min-scale', '0.75', '--stim-main-logits',
                                      'standardized']),
    # ST++ without smaller inputs and with the main loss on raw logits (as ST and timm), KL- subnet loss kept
    'st++ raw main': ('stpp-rawmain', ['--stim', 'st++', '--stim-min-scale', '1', '--stim-main-logits', 'raw']),
    'st++ raw main 0.43': ('stpp-rawmain-043', ['--stim', 'st++', '--stim-min-scale', '0.43', '--stim-main-logits',
                                                'raw']),
    'st++ authors': ('stpp-authors', ['--stim', 'st++', '--stim-min-scale', '0.43', '--stim-main-logits',
                                      'standardized', '--stim-bn', 'update', '--stim-bn-recal', '2000']),
}
_DEFAULT_VARIANTS = ('baseline', 'st', 'st++', 'st++ full-size')
# The slowest runs first, so the two parallel workers finish together.
_ORDER = ('st++ authors', 'st', 'st++ raw main 0.43', 'st++ raw main', 'st++ full-size', 'st++ min 0.75', 'st++',
          'baseline')


def parse_args(argv: Sequence[str] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--epochs', type=int, default=10, help='training epochs of every run')
    parser.add_argument('--variants', nargs='+', default=list(_DEFAULT_VARIANTS), choices=list(VARIANTS) + ['all'],
                        help="variants to train and compare ('all': every one)")
    parser.add_argument('--config', default=str(REPO / 'hparams' / 'digits_resnet18.yaml'))
    parser.add_argument('--model', default=None,
                        help="timm model to train (train_stim.py --model; default: the recipe's, resnet18)")
    parser.add_argument('--img-size', type=int, default=None, help='train and eval image size (default: the recipe\'s)')
    parser.add_argument('--eval-sizes', type=int, nargs='*', default=[],
                        help='also measure every subnet at these eval image sizes (BN re-estimated at that size)')
    parser.add_argument('--name', default='loafing_digits', help='results file name: <results-dir>/<name>.md/.csv/.png')
    parser.add_argument('--parallel', type=int, default=2, help='trainings run at once (one thread each)')
    parser.add_argument('--subnets', default='all',
                        help="ST-space subnets measured: 'all', or 'random:N' (the same N for every variant of a seed;"
                             " for deep models whose ST space is large)")
    parser.add_argument('--bn-recal', type=int, default=500, help='training images per subnet BN re-estimation')
    parser.add_argument('--checkpoint', default='last',
                        help="'last' (default: no selection on the val split) or 'best'")
    parser.add_argument('--work-dir', default=str(REPO / 'output' / 'loafing_digits'))
    parser.add_argument('--results-dir', default=str(REPO / 'docs' / 'results'))
    parser.add_argument('--retrain', action='store_true', help='retrain even if a finished run exists')
    parser.add_argument('--report-only', action='store_true',
                        help='only rewrite the results from the finished runs and loafing reports (and saved timings)')
    args = parser.parse_args(argv)
    if 'all' in args.variants:
        args.variants = list(VARIANTS)
    if args.model:
        import timm
        if not timm.is_model(args.model):
            parser.error(f'unknown timm model {args.model!r}: give a name from timm.list_models(), e.g. resnet34')
    return args


def model_names(args: argparse.Namespace) -> Tuple[str, str]:
    """The timm model the runs train (--model, else the recipe's `model`, else train_stim.py's default) and the
    name the report shows ('ResNet-34' for resnet34, otherwise the timm name)."""
    import yaml
    name = args.model
    if not name:
        with open(args.config) as f:
            name = (yaml.safe_load(f) or {}).get('model')
    if not name:
        from timm_stim.train_args import build_parser
        name = build_parser().get_default('model')
    match = re.fullmatch(r'resnet(\d+)', name)
    return name, (f'ResNet-{match.group(1)}' if match else name)


def model_layout(args: argparse.Namespace):
    """Residual-block layout of the model as trained here (10 classes, the run's image size), with a flat model's
    blocks grouped into the pseudo-stages that training and `timm_stim.loafing` use."""
    import timm
    from timm_stim import find_residual_blocks
    from timm_stim.sampler import split_flat_layout
    size = args.img_size or 32
    model = timm.create_model(model_names(args)[0], num_classes=10)
    return split_flat_layout(find_residual_blocks(model, input_size=(3, size, size)))


def depth_vectors(layout, space: str) -> List[str]:
    """Every depth vector of an ST space on `layout`, full net first, written as loafing.csv writes them."""
    from timm_stim.loafing import make_subnet_specs
    staged, specs = make_subnet_specs(layout, 'all', space=space)
    return [','.join(map(str, staged.depths(s))) for s in specs]


def _join(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else ', '.join(words[:-1]) + ' and ' + words[-1]


def _stage_names(layout) -> List[str]:
    """'layer1', ... (the parent module of each stage's blocks), or 'stage N' where stages share one (ViT)."""
    names = [layout.paths[layout.stage_indices(s)[0]].rpartition('.')[0] for s in range(layout.num_stages)]
    if all(names) and len(set(names)) == len(names):
        return names
    return [f'stage {s + 1}' for s in range(layout.num_stages)]


def describe_space(layout, space: str) -> str:
    """What a space lets each stage drop, in words; ST++ on ResNet-18: 'layer1 and layer4 always full; layer2 and
    layer3 may drop their last block'."""
    from timm_stim.sampler import space_k_list
    groups: Dict[int, List[str]] = {}
    for name, k in zip(_stage_names(layout), space_k_list(layout, space)):
        groups.setdefault(k - 1, []).append(name)
    parts = []
    for drop, names in sorted(groups.items()):
        its = 'its' if len(names) == 1 else 'their'
        if drop == 0:
            parts.append(f'{_join(names)} always full')
        else:
            parts.append(f'{_join(names)} may drop {its} last block' if drop == 1 else
                         f'{_join(names)} may drop up to {its} last {drop} blocks')
    return '; '.join(parts)


def _env() -> Dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', HF_HUB_OFFLINE='1')
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(REPO), env.get('PYTHONPATH', '')]))
    return env


def _run_dir(args: argparse.Namespace, variant: str, seed: int) -> Path:
    return Path(args.work_dir) / 'train' / f'{VARIANTS[variant][0]}-s{seed}'


def finished_run(run_dir: Path, epochs: int) -> bool:
    """A training run with all `epochs` summary rows and its last checkpoint (not retrained on a restart)."""
    summary = run_dir / 'summary.csv'
    if not (summary.is_file() and (run_dir / 'last.pth.tar').is_file()):
        return False
    with summary.open(newline='') as f:
        return len(list(csv.DictReader(f))) >= epochs


def _train_command(args: argparse.Namespace, variant: str, seed: int) -> List[str]:
    run_dir = _run_dir(args, variant, seed)
    return [sys.executable, str(REPO / 'train_stim.py'), '-c', args.config, *VARIANTS[variant][1],
            '--seed', str(seed), '--epochs', str(args.epochs), '--checkpoint-hist', '1',
            *(['--model', args.model] if args.model else []),
            *(['--img-size', str(args.img_size)] if args.img_size else []),
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
    for seed in args.seeds:  # seed by seed, so that an interrupted run leaves complete seeds
        for variant in sorted(args.variants, key=_ORDER.index):
            run_dir = _run_dir(args, variant, seed)
            if not args.retrain and finished_run(run_dir, args.epochs):
                print(f'  skip {run_dir.name}: finished run exists', flush=True)
                continue
            jobs.append((run_dir.name, _train_command(args, variant, seed), run_dir.parent / f'{run_dir.name}.log'))
    print(f'training {len(jobs)} runs, {args.parallel} at a time', flush=True)
    return _run_all(jobs, args.parallel)


def _loafing_dir(args: argparse.Namespace, seed: int, eval_size: int = None) -> Path:
    """Loafing report of one seed, at the training size (eval_size None) or at another eval image size."""
    return Path(args.work_dir) / 'loafing' / (f'seed{seed}' if eval_size is None else f'seed{seed}-{eval_size}px')


def _loafing_done(args: argparse.Namespace, out: Path, seed: int) -> bool:
    """A loafing report exists for exactly these variants and is newer than every checkpoint it evaluates."""
    report = out / 'loafing.json'
    if not report.is_file():
        return False
    labels = {r['model'] for r in json.loads(report.read_text())['results']}
    name = {'best': 'model_best.pth.tar', 'last': 'last.pth.tar'}.get(args.checkpoint, args.checkpoint)
    checkpoints = [_run_dir(args, v, seed) / name for v in args.variants]
    return (labels == {VARIANTS[v][0] for v in args.variants} and all(c.is_file() for c in checkpoints)
            and report.stat().st_mtime > max(c.stat().st_mtime for c in checkpoints))


def loafing_all(args: argparse.Namespace) -> Dict[str, float]:
    """One `python -m timm_stim.loafing` per seed (and eval size) over all variants (all ST subnets, BN
    re-estimation on training images at the same size)."""
    display = model_names(args)[1]
    jobs = []
    for eval_size in [None, *args.eval_sizes]:
        for seed in args.seeds:
            out = _loafing_dir(args, seed, eval_size)
            if not args.retrain and _loafing_done(args, out, seed):
                print(f'  skip {out}: up-to-date loafing report exists', flush=True)
                continue
            at = '' if eval_size is None else f', evaluated at {eval_size} px'
            command = [sys.executable, '-m', 'timm_stim.loafing',
                       *[str(_run_dir(args, v, seed)) for v in args.variants],
                       '--labels', *[VARIANTS[v][0] for v in args.variants], '--checkpoint', args.checkpoint,
                       '--subnets', args.subnets, '--space', 'st', '--bn-recal', str(args.bn_recal),
                       '--seed', str(seed),
                       *(['--img-size', str(eval_size)] if eval_size else []),
                       '-j', '0', '-b', '128', '--device', 'cpu', '--output', str(out),
                       '--title', f'Network loafing on digits, {display}, seed {seed}{at}']
            jobs.append((f'loafing {out.name}', command, out.parent / f'{out.name}.log'))
    print(f'loafing evaluation: {len(jobs)} reports (seeds x eval sizes)', flush=True)
    return _run_all(jobs, args.parallel)


# ----------------------------------------------------------------------------------------------- aggregation


def _mean_std(values: List[float]) -> Tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float('nan'))


def _final_train_top1(run_dir: Path, checkpoint: str) -> float:
    """Top-1 the training script logged for the evaluated checkpoint (cross-check of the loafing full net)."""
    with (run_dir / 'summary.csv').open(newline='') as f:
        top1 = [float(r['eval_top1']) for r in csv.DictReader(f)]
    return max(top1) if checkpoint == 'best' else top1[-1]


def collect(args: argparse.Namespace, eval_size: int = None
            ) -> Tuple[List[Dict[str, Any]], Dict[str, Dict[str, List[float]]]]:
    """Every subnet row of every run (with variant, seed and eval size) and, per variant, the per-seed summary
    metrics; at the training size (eval_size None) or at another eval image size."""
    key_to_variant = {VARIANTS[v][0]: v for v in args.variants}
    rows, per_variant = [], {v: {} for v in args.variants}
    for seed in args.seeds:
        payload = json.loads((_loafing_dir(args, seed, eval_size) / 'loafing.json').read_text())
        for r in payload['results']:
            rows.append(dict(variant=key_to_variant[r['model']], seed=seed,
                             eval_size=eval_size or args.img_size or 32, **r))
        for s in payload['summary']:
            variant = key_to_variant[s['model']]
            metrics = dict(s, loafing_gap=s['full_top1'] - s['mean_top1'],
                           loafing_gap_bnrecal=s['full_top1_bnrecal'] - s['mean_top1_bnrecal'])
            if eval_size is None:
                metrics['train_top1'] = _final_train_top1(_run_dir(args, variant, seed), args.checkpoint)
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


def markdown_table(per_variant: Dict[str, Dict[str, List[float]]], deltas: bool = True) -> str:
    header = ['variant'] + [label for _, label in _COLUMNS]
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join(['---'] + ['---:'] * len(_COLUMNS)) + '|']
    for variant, metrics in per_variant.items():
        lines.append('| ' + ' | '.join([variant] + [_pm(metrics[k]) for k, _ in _COLUMNS]) + ' |')
    base = per_variant.get('baseline')
    if base and deltas:
        lines += ['', 'Difference to the baseline (difference of seed means ± its standard error):', '',
                  '| variant | full net | mean subnet | min subnet | full net, BN re-est. | mean subnet, BN re-est. '
                  '| min subnet, BN re-est. |', '|---|---:|---:|---:|---:|---:|---:|']
        keys = ('full_top1', 'mean_top1', 'min_top1', 'full_top1_bnrecal', 'mean_top1_bnrecal', 'min_top1_bnrecal')
        for variant, metrics in per_variant.items():
            if variant != 'baseline':
                lines.append('| ' + ' | '.join([variant] + [_delta(metrics[k], base[k]) for k in keys]) + ' |')
    return '\n'.join(lines)


def space_breakdown(rows: List[Dict[str, Any]], variants: Sequence[str], layout) -> str:
    """Mean subnet top-1 inside vs outside the ST++ space (the only subnets ST++ trains), mean ± std over seeds."""
    inside = set(depth_vectors(layout, 'st++'))
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


def _mean_rows(rows: List[Dict[str, Any]], by: str = 'variant') -> List[Dict[str, Any]]:
    """Per `by` (the variant, or a run name) and depth vector, accuracies averaged over seeds (for the plot)."""
    groups: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r[by], r['depths']), []).append(r)
    out = []
    for (name, _), group in groups.items():
        mean = dict(group[0], model=f'{name} ({len(group)} seeds)')
        for key in ('top1', 'top5', 'top1_bnrecal', 'top5_bnrecal'):
            mean[key] = statistics.fmean(g[key] for g in group)
        out.append(mean)
    return out


def size_table(args: argparse.Namespace, per_size: Dict[int, Dict[str, Dict[str, List[float]]]]) -> str:
    """Full net and mean / min subnet top-1 at every eval size, BN as trained and re-estimated (mean ± std)."""
    sizes = sorted(per_size)
    keys = (('full_top1', 'full'), ('mean_top1', 'mean subnet'), ('min_top1', 'min subnet'),
            ('full_top1_bnrecal', 'full, BN re-est.'), ('mean_top1_bnrecal', 'mean subnet, BN re-est.'),
            ('min_top1_bnrecal', 'min subnet, BN re-est.'))
    header = ['variant', 'eval px'] + [label for _, label in keys]
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join(['---', '---:'] + ['---:'] * len(keys)) + '|']
    for variant in args.variants:
        for size in sizes:
            metrics = per_size[size][variant]
            lines.append('| ' + ' | '.join([variant, str(size)] + [_pm(metrics[k]) for k, _ in keys]) + ' |')
    return '\n'.join(lines)


def setup_section(args: argparse.Namespace, layout, rel_flops: float, check: float) -> str:
    """The report's '## Setup' section; the model facts (blocks per stage, ST space) come from `layout`."""
    img_size = args.img_size or 32
    display = model_names(args)[1]
    n_st = len(depth_vectors(layout, 'st'))
    space = f"{display}'s ST space ({describe_space(layout, 'st')})"
    measured = (f'all {n_st} depth vectors of {space}, i.e. {n_st - 1} subnets besides the full net'
                if args.subnets == 'all' else
                f'{args.subnets.split(":")[1]} random depth vectors of the {n_st} of {space} (drawn per seed, the same '
                f'for every variant) and the full net')
    model_flag = f'`--model {args.model}`, ' if args.model else ''
    size_flag = f' and `--img-size {img_size}`' if args.img_size else ''
    blocks = '/'.join(map(str, layout.stage_sizes))
    variant_list = '\n'.join(f'  - `{v}`: `{" ".join(VARIANTS[v][1])}`' for v in args.variants)
    return f"""## Setup
- Data: the embedded scikit-learn digits (1438 train / 359 validation images, 8x8 upsampled to {img_size} px,
  10 classes). One validation image is 0.28 % top-1.
- Model: {display} (timm `{model_names(args)[0]}`, 10 classes; {blocks} residual blocks per stage).
- Recipe: `{os.path.relpath(args.config, REPO)}` (SGD, cosine, label smoothing 0.1) with
  {model_flag}`--epochs {args.epochs}`{size_flag}, the same for every variant; seeds
  {', '.join(map(str, args.seeds))}. One subnet per step (M = 1), train_stim.py defaults otherwise. Variants
  (train_stim.py flags):
{variant_list}
- Evaluation: the `{args.checkpoint}` checkpoint of each run (no selection on the validation split);
  {measured}, mean relative FLOPs {rel_flops:.3f}
  (counted with FlopCounterMode at {img_size} px). "BN re-est." = BatchNorm statistics re-estimated for each subnet
  on {args.bn_recal} training images (eval transforms, fixed per seed), on a copy of the model; without it, every
  subnet uses the BN statistics stored in the checkpoint ("as trained").
- Cross-check: the full-net top-1 measured here matches the training log's final eval top-1 within {check:.2f} points.
"""


def stpp_note(args: argparse.Namespace, layout) -> str:
    """The sentence that introduces the inside / outside the ST++ space table."""
    n_pp, n_st = len(depth_vectors(layout, 'st++')), len(depth_vectors(layout, 'st'))
    measured = f'all {n_st}' if args.subnets == 'all' else f'{args.subnets.split(":")[1]} random ones of the {n_st}'
    return (f"ST++ (`--stim st++`) trains only the {n_pp} depth vectors of its own space (on {model_names(args)[1]}: "
            f"{describe_space(layout, 'st++')}); the table above measures {measured} of the ST space. Mean subnet "
            f"top-1 inside vs outside the ST++ space (mean ± std over seeds):")


def write_results(args: argparse.Namespace, timings: Dict[str, float], wall: float, command: str) -> str:
    from timm_stim.loafing_report import plot_loafing
    display = model_names(args)[1]
    layout = model_layout(args)
    rows, per_variant = collect(args)
    img_size = args.img_size or 32
    per_size = {img_size: per_variant}
    all_rows = list(rows)
    for eval_size in args.eval_sizes:
        size_rows, per_size[eval_size] = collect(args, eval_size)
        all_rows += size_rows
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    fields = ['variant', 'seed', 'eval_size', 'depths', 'keep', 'is_full', 'rel_depth', 'rel_flops', 'top1', 'top5',
              'top1_bnrecal', 'top5_bnrecal', 'bn_recal_images', 'num_val']
    with (results / f'{args.name}.csv').open('w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction='ignore')
        writer.writeheader()
        writer.writerows(all_rows)
    seeds = len(args.seeds)
    plot_loafing(_mean_rows(rows), results / f'{args.name}.png',
                 title=f'Network loafing on digits ({img_size} px), {display}: every ST subnet, top-1 averaged '
                       f'over {seeds} seeds')

    table = markdown_table(per_variant)
    breakdown = space_breakdown(rows, list(per_variant), layout)
    subnets = [r for r in rows if not r['is_full']]
    rel_flops = statistics.fmean(r['rel_flops'] for r in subnets) if subnets else float('nan')
    check = max(abs(a - b) for m in per_variant.values() for a, b in zip(m['full_top1'], m['train_top1']))
    train_s = sum(v for k, v in timings.items() if not k.startswith('loafing'))
    trained = sum(not k.startswith('loafing') for k in timings)
    reused = len(args.variants) * seeds - trained
    per_variant_time = ', '.join(
        f'{v} {statistics.fmean(t):.0f} s' for v in args.variants
        if (t := [timings[k] for k in timings if k.rsplit('-s', 1)[0] == VARIANTS[v][0]]))
    reuse_note = (f' {reused} finished runs were reused from an earlier invocation (not in these times).'
                  if reused else '')
    size_section = ''
    if args.eval_sizes:
        size_section = f"""
## The same models evaluated at other image sizes

Every subnet again, on the validation images resized to each size (`python -m timm_stim.loafing --img-size N`);
"BN re-est." re-estimates each subnet's BatchNorm statistics on {args.bn_recal} training images at that size.
Trained at {img_size} px (mean ± std over {seeds} seeds):

{size_table(args, per_size)}
"""
    md = f"""# Network loafing on digits at {img_size} px ({display}): {', '.join(args.variants)}

Does Stimulative Training make the residual subnetworks inside a network better (less "loafing"), and the
full network with them? Measured with `timm_stim.loafing`.

{setup_section(args, layout, rel_flops, check)}
## Results (top-1 %, mean ± std over {seeds} seeds; "subnet" columns exclude the full net)

{table}

![subnet top-1 vs relative FLOPs]({args.name}.png)

{stpp_note(args, layout)}

{breakdown}
{size_section}
## Caveats
- Not compute-matched: an ST / ST++ step also runs one subnet forward and backward, so these runs cost
  more per epoch than the baseline (compare the training times below); all variants get the same epochs.
- The task is close to saturation (full nets near 99 %), so full-net differences are a few validation images.
- {seeds} seeds only: "±" in the first table is the sample std over seeds, in the difference table the standard
  error of the difference of means (unpaired); neither is a significance test.

Per-subnet numbers of every run (every eval size): `{args.name}.csv`. Per-seed reports (csv/json/png):
`{os.path.relpath(args.work_dir, REPO)}/loafing/seed*/`.

## How this was produced
```
{command}
```
Wall time {wall / 60:.1f} min in total on a shared 2-core CPU machine (trainings {args.parallel} at a time with one
thread each; sum of training wall times {train_s / 60:.1f} min, loafing evaluation
{sum(v for k, v in timings.items() if k.startswith('loafing')) / 60:.1f} min summed over seeds and sizes).{reuse_note}
Mean training wall time per run ({args.parallel} at once, one thread each, on a machine shared with other jobs, so
only roughly comparable): {per_variant_time}.
"""
    (results / f'{args.name}.md').write_text(md)
    return table


def main(argv: Sequence[str] = None) -> int:
    args = parse_args(argv)
    timing_file = Path(args.work_dir) / 'timings.json'
    if args.report_only:
        saved = json.loads(timing_file.read_text())
        timings, wall, command = saved['timings'], saved['wall'], saved['command']
    else:
        given = argv if argv is not None else sys.argv[1:]
        command = 'python ' + shlex.join([os.path.relpath(__file__, REPO), *given])
        start = time.time()
        timings = train_all(args)
        timings.update(loafing_all(args))
        wall = time.time() - start
        if timing_file.is_file() and not args.retrain:  # restarted: keep the times of the runs reused now
            saved = json.loads(timing_file.read_text())
            timings, wall = {**saved['timings'], **timings}, saved['wall'] + wall
            command = saved['command'] if saved['command'] == command else f"{saved['command']}\n{command}"
        timing_file.parent.mkdir(parents=True, exist_ok=True)
        timing_file.write_text(json.dumps(dict(timings=timings, wall=wall, command=command), indent=2))
    table = write_results(args, timings, wall, command)
    print(table)
    print(f'\nwall time {wall / 60:.1f} min; wrote {args.results_dir}/{args.name}.md, .csv, .png')
    return 0


if __name__ == '__main__':
    sys.exit(main())
