"""Set-up time of `create_stimulator(model, create_stim_config('st++'))` per model, on one CPU thread.

    python benchmarks/setup_time.py --before f99d7e2            # every model of docs/models.md + the extras
    python benchmarks/setup_time.py --models resnet50 xception41 --repeat 3

Each measurement is a fresh process (OMP_NUM_THREADS=1, torch.set_num_threads(1)) that builds the model with
the kwargs its smaller inputs need (`smaller_input_kwargs`), untimed, at its default input size S, and then
times the stimulator's set-up: block discovery and the check of every subnet input size ST++ may draw
([floor(0.43 S), S]). `--stim-size-fallback` is on, so models without smaller inputs finish instead of raising.
With `--before REV` the same measurement also runs on the `timm_stim` package of git revision REV (extracted
with `git archive` into a temporary folder, first on the Python path), alternating before/after per model so
that drift of a shared machine hits both; the table prints both and their ratio. Times are wall seconds and the
process's CPU seconds (one thread: the wall time of an unloaded machine; on a loaded one the steadier figure).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
# (model, training size) beyond docs/models.md: the slow set-ups of issue 20 and the 224 px ResNet-50 target
EXTRA: List[Tuple[str, Optional[int]]] = [
    ('resnet50', 224), ('inception_resnet_v2', None), ('vitamin_small_224', None), ('xception41', None),
    ('pvt_v2_b0', None), ('visformer_tiny', None), ('volo_d1_224', None),
]


def docs_models() -> List[str]:
    """Every model named in a table row of docs/models.md (covered and refused)."""
    text = (ROOT / 'docs' / 'models.md').read_text()
    return list(dict.fromkeys(re.findall(r'^\| `([\w.]+)` \|', text, flags=re.M)))


def child(name: str, size: Optional[int]) -> Dict[str, object]:
    """One measurement, in this process: the seconds `create_stimulator` takes on `name` at `size`."""
    import torch
    torch.set_num_threads(1)
    import timm
    import timm_stim
    from timm_stim import create_stim_config, create_stimulator, smaller_input_kwargs
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **smaller_input_kwargs(name))
    size = size or int(model.pretrained_cfg.get('input_size', (3, 224, 224))[-1])
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        stim = create_stimulator(model, create_stim_config('st++', size_fallback=True), full_size=size)
        outcome = f'{len(stim.size_sampler.sizes)} sizes'
    except Exception as e:  # noqa: BLE001 -- a refusal is an outcome too; its time counts
        outcome = f'refused ({type(e).__name__})'
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {'seconds': seconds, 'cpu_seconds': cpu_seconds, 'size': size, 'outcome': outcome,
            'package': str(Path(timm_stim.__file__).parent)}


def run_child(name: str, size: Optional[int], pythonpath: str, timeout: float) -> Dict[str, object]:
    """`child` in a fresh single-thread process whose `timm_stim` comes from `pythonpath`."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1',
           'PYTHONPATH': pythonpath, 'PYTHONWARNINGS': 'ignore'}
    cmd = [sys.executable, __file__, '--child', name, '--size', str(size or 0)]
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd='/')
    except subprocess.TimeoutExpired:
        return {'seconds': float('inf'), 'cpu_seconds': float('inf'), 'outcome': f'timeout {timeout:.0f} s'}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith('{')]
    if out.returncode or not lines:
        last = (out.stderr.strip().splitlines() or ['?'])[-1][:80]
        return {'seconds': float('nan'), 'cpu_seconds': float('nan'), 'outcome': f'error: {last}'}
    return json.loads(lines[-1])


def extract(rev: str, into: str) -> str:
    """The `timm_stim` package of git revision `rev`, extracted under `into` (read-only git: `git archive`)."""
    archive = subprocess.run(['git', 'archive', rev, 'timm_stim'], cwd=ROOT, capture_output=True, check=True)
    path = Path(into) / 'archive.tar'
    path.write_bytes(archive.stdout)
    with tarfile.open(path) as tar:
        tar.extractall(into)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='*', help='model names (default: docs/models.md and the extras)')
    parser.add_argument('--size', type=int, default=0, help='training size S (default: the model\'s own)')
    parser.add_argument('--before', help='git revision whose timm_stim is the "before" column')
    parser.add_argument('--repeat', type=int, default=1, help='measurements per model and side (median)')
    parser.add_argument('--timeout', type=float, default=600, help='seconds one measurement may take')
    parser.add_argument('--only-before', action='store_true', help='measure only the --before revision')
    parser.add_argument('--json', help='also write every measurement to this file')
    parser.add_argument('--child', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.size or None)))
        return
    if args.models:
        models = [(m, args.size or None) for m in args.models]
    else:
        models = [(m, None) for m in docs_models()] + [e for e in EXTRA if e[0] not in docs_models()]
    with tempfile.TemporaryDirectory() as tmp:
        sides = {} if args.before and args.only_before else {'after': str(ROOT)}
        if args.before:
            sides = {'before': extract(args.before, tmp), **sides}
        print(f'# set-up seconds, one CPU thread, {args.repeat} run(s) per side (median)'
              + (f'; before = {args.before}' if args.before else ''), flush=True)
        header = (['model', 'S'] + [f'{side} {clock} s' for side in sides for clock in ('wall', 'cpu')]
                  + (['ratio (cpu)'] if len(sides) == 2 else []) + ['outcome'])
        print('| ' + ' | '.join(header) + ' |\n|' + '---|' * len(header), flush=True)
        results = []
        for name, size in models:
            runs: Dict[str, List[Dict[str, object]]] = {side: [] for side in sides}
            for _ in range(args.repeat):
                for side, path in sides.items():  # before, after, before, after: drift hits both
                    runs[side].append(run_child(name, size, path, args.timeout))
            med = {(side, clock): statistics.median(float(r[key]) for r in rs) for side, rs in runs.items()
                   for clock, key in (('wall', 'seconds'), ('cpu', 'cpu_seconds'))}
            last = list(runs.values())[-1][-1]
            row = [f'`{name}`', str(last.get('size', size or '?'))]
            row += [f'{med[side, clock]:.2f}' for side in sides for clock in ('wall', 'cpu')]
            if len(sides) == 2:
                after = med['after', 'cpu']
                row.append(f'{med["before", "cpu"] / after:.1f}x' if after > 0 else '-')
            outcomes = ' / '.join(dict.fromkeys(str(rs[-1]['outcome']) for rs in runs.values()))
            print('| ' + ' | '.join(row + [outcomes]) + ' |', flush=True)
            results.append({'model': name, 'runs': runs})
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == '__main__':
    main()
