#!/usr/bin/env python3
"""The `train` section of gpu_bench.sh: a synthetic image folder, and the checks of a finished train_stim.py run.

    python benchmarks/train_check.py data --root DIR [--classes 4 --train-per-class 1280 --val-per-class 64 --size 256]
    python benchmarks/train_check.py check --run-dir OUT/EXP --log RUN.log --model resnet50 --num-classes 4 \\
        [--exit-code N] [--loop-json loop.json] [--max-recompiles 8] [--expect-log TEXT ...] [--epochs N] \\
        --json result.json

`data` writes an ImageNet-shaped folder (DIR/train/<class>/*.jpg, DIR/validation/<class>/*.jpg): JPEGs of random
smooth colour fields, a few classes, so that timm's ImageFolder reader, decoding and augmentation run as on
ImageNet. `check` reads what the run left and writes one JSON: the exit code; every loss column of summary.csv
finite; the number of dynamo recompiles in the log (TORCH_LOGS=recompiles prints one 'Recompiling function'
block each), against --max-recompiles; model_best.pth.tar (and its EMA weights) loaded with torch.load
(weights_only; argparse.Namespace, which timm's CheckpointSaver
stores the args as, allow-listed when needed) into a plain `timm.create_model` with strict
load_state_dict; and the img/s train_stim.py logs (median of its log lines after the first epoch, which
compiles) against the step benchmark's img/s for the same model, batch and settings (step_cost.py
--script-loop-config JSON: 'minimal_img_s'), with the ratio; each --expect-log text found in the log (the DDP,
loss-scaling, BN re-estimation and resume lines), and with --epochs that many rows in summary.csv.
Exit code of `check`: 0 when every check passes, 1 otherwise.
"""
from __future__ import annotations

import argparse
import collections
import csv
import json
import math
import os
import pickle
import re
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Dict, Optional

import numpy as np

TRAIN_LINE = re.compile(r'Train: (\d+) \[\s*(\d+)/(\d+).*?([\d.]+) img/s')
RECOMPILE = re.compile(r'Recompiling function (\S+)')
# the first guard that failed, on the line after 'triggered by the following guard failure(s):'
GUARD_FAILURE = re.compile(r'guard failure\(s\):\n[^\n]*?- \d+/\d+: ([^\n]*)')


def _write_images(job) -> int:
    from PIL import Image
    folder, seed, count, size = job
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # upsampled: smooth, JPEG-friendly, cheap
        Image.fromarray(small).resize((size, size), Image.BILINEAR).save(os.path.join(folder, f'{i:05d}.jpg'),
                                                                         quality=90)
    return count


def make_folder(root: str, classes: int, train_per_class: int, val_per_class: int, size: int,
                workers: Optional[int] = None) -> Dict[str, Any]:
    """DIR/{train,validation}/class_k/*.jpg; returns the image counts."""
    jobs = [(os.path.join(root, split, f'class_{c}'), 1000 * c + (split == 'validation'), n, size)
            for split, n in (('train', train_per_class), ('validation', val_per_class)) for c in range(classes)]
    with ProcessPoolExecutor(max_workers=workers or min(len(jobs), os.cpu_count() or 1)) as pool:
        written = list(pool.map(_write_images, jobs))
    return {'root': root, 'classes': classes, 'train_images': classes * train_per_class,
            'val_images': classes * val_per_class, 'size': size, 'written': sum(written)}


def check_summary(path: str) -> Dict[str, Any]:
    """Every *loss* column of summary.csv present and finite."""
    if not os.path.exists(path):
        return {'ok': False, 'problem': f'{path} missing'}
    with open(path) as f:
        rows = list(csv.DictReader(f))
    losses = {k: [float(r[k]) for r in rows] for k in (rows[0] if rows else {}) if 'loss' in k}
    bad = {k: v for k, v in losses.items() if not all(math.isfinite(x) for x in v)}
    return {'ok': bool(rows) and bool(losses) and not bad, 'epochs': len(rows), 'losses': losses,
            'non_finite': sorted(bad), 'last': rows[-1] if rows else None}


def count_recompiles(log_text: str, limit: int) -> Dict[str, Any]:
    functions = RECOMPILE.findall(log_text)
    reasons = collections.Counter(m.strip()[:120] for m in GUARD_FAILURE.findall(log_text))
    return {'ok': len(functions) <= limit, 'recompiles': len(functions), 'limit': limit,
            'functions': sorted(set(functions)), 'first_guard_failures': dict(reasons.most_common(10)),
            'limit_hits': log_text.count('recompile_limit') + log_text.count('cache_size_limit')}


def check_checkpoint(path: str, model_name: str, num_classes: int) -> Dict[str, Any]:
    """The checkpoint's weights (and EMA weights) load into a plain timm model, strictly."""
    import timm
    import torch
    if not os.path.exists(path):
        return {'ok': False, 'problem': f'{path} missing'}
    try:
        ckpt, plain_safe_load = torch.load(path, map_location='cpu', weights_only=True), True
    except pickle.UnpicklingError:  # timm's CheckpointSaver stores args as an argparse.Namespace: allow that only
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt, plain_safe_load = torch.load(path, map_location='cpu', weights_only=True), False
    out: Dict[str, Any] = {'ok': True, 'path': path, 'keys': sorted(k for k in ckpt if isinstance(k, str)),
                           'weights_only_without_allowlist': plain_safe_load}
    for key in ('state_dict', 'state_dict_ema'):
        if key not in ckpt:
            continue
        model = timm.create_model(model_name, pretrained=False, num_classes=num_classes)
        try:
            model.load_state_dict(ckpt[key], strict=True)
            out[key] = 'loaded (strict)'
        except RuntimeError as e:
            out[key] = f'failed: {str(e).splitlines()[0]}'
            out['ok'] = False
    out['ok'] = out['ok'] and 'state_dict' in ckpt
    return out


def train_speed(log_text: str, skip_epochs: int = 1) -> Dict[str, Any]:
    """img/s of train_stim.py's log lines from epoch `skip_epochs` on, first line of each epoch excluded."""
    lines = [(int(e), int(i), float(v)) for e, i, _, v in TRAIN_LINE.findall(log_text)]
    steady = [v for e, i, v in lines if e >= skip_epochs and i > 0]
    return {'log_lines': len(lines), 'steady_lines': len(steady),
            'img_s_median': statistics.median(steady) if steady else None, 'img_s_lines': [v for _, _, v in lines]}


def check_log_lines(log_text: str, expected) -> Dict[str, Any]:
    """Each expected text (e.g. 'Distributed: 1 processes': the run joined a process group and DDP wrapped the
    model) found in the log."""
    missing = [text for text in expected if text not in log_text]
    return {'ok': not missing, 'expected': list(expected), 'missing': missing}


def check_run(args) -> Dict[str, Any]:
    with open(args.log, errors='replace') as f:
        log_text = f.read()
    result: Dict[str, Any] = {
        'run_dir': args.run_dir, 'log': args.log,
        'exit': {'ok': args.exit_code == 0, 'code': args.exit_code},
        'summary': check_summary(os.path.join(args.run_dir, 'summary.csv')),
        'recompiles': count_recompiles(log_text, args.max_recompiles),
        'checkpoint': check_checkpoint(os.path.join(args.run_dir, 'model_best.pth.tar'), args.model,
                                       args.num_classes),
        'speed': train_speed(log_text, args.skip_epochs),
        'log_lines': check_log_lines(log_text, args.expect_log or []),
    }
    if args.loop_json and os.path.exists(args.loop_json):
        with open(args.loop_json) as f:
            loop = (json.load(f) or {}).get('script_loop') or {}
        ref = loop.get('minimal_img_s')
        got = result['speed']['img_s_median']
        result['speed'].update(step_benchmark_img_s=ref, script_loop_img_s=loop.get('script_img_s'),
                               vs_step_benchmark=(got / ref) if got and ref else None)
    result['ok'] = all(result[k]['ok'] for k in ('exit', 'summary', 'recompiles', 'checkpoint', 'log_lines'))
    if args.epochs is not None:  # e.g. a resumed run: the summary holds every epoch, the resumed ones included
        result['summary']['expected_epochs'] = args.epochs
        result['ok'] = result['ok'] and result['summary'].get('epochs') == args.epochs
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    sub = p.add_subparsers(dest='command', required=True)
    d = sub.add_parser('data', help='write the synthetic image folder')
    d.add_argument('--root', required=True)
    d.add_argument('--classes', type=int, default=4)
    d.add_argument('--train-per-class', type=int, default=1280)
    d.add_argument('--val-per-class', type=int, default=64)
    d.add_argument('--size', type=int, default=256, help='image side in pixels')
    d.add_argument('--workers', type=int, default=None)
    c = sub.add_parser('check', help='check a finished train_stim.py run')
    c.add_argument('--run-dir', required=True, help='the experiment folder (summary.csv, model_best.pth.tar)')
    c.add_argument('--log', required=True, help="the run's stdout + stderr")
    c.add_argument('--model', required=True)
    c.add_argument('--num-classes', type=int, required=True)
    c.add_argument('--exit-code', type=int, default=0, help="the run's exit code")
    c.add_argument('--max-recompiles', type=int, default=8)
    c.add_argument('--skip-epochs', type=int, default=1, help='epochs left out of the img/s median (compile)')
    c.add_argument('--loop-json', default=None, help='step_cost.py JSON with a script_loop comparison')
    c.add_argument('--expect-log', action='append', default=None, metavar='TEXT',
                   help='text the log must hold (repeatable), e.g. "Distributed: 1 processes"')
    c.add_argument('--epochs', type=int, default=None, help='epochs summary.csv must hold (a resumed run: all)')
    for q in (d, c):
        q.add_argument('--json', default=None, help='write the result here')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    result = make_folder(args.root, args.classes, args.train_per_class, args.val_per_class, args.size, args.workers) \
        if args.command == 'data' else check_run(args)
    text = json.dumps(result, indent=1, default=str)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, 'w') as f:
            f.write(text)
    if args.command == 'data':
        print(f"[data] {result['train_images']} train / {result['val_images']} validation images of "
              f"{result['size']} px in {result['classes']} classes under {result['root']}")
        return 0
    s = result['speed']
    print(f"[train check] {'OK' if result['ok'] else 'FAILED'}: exit {result['exit']['code']}, "
          f"{result['summary'].get('epochs', 0)} epochs, losses finite {result['summary']['ok']}, "
          f"recompiles {result['recompiles']['recompiles']} (limit {result['recompiles']['limit']}), "
          f"checkpoint {result['checkpoint'].get('state_dict', result['checkpoint'].get('problem'))}"
          + (f", EMA {result['checkpoint']['state_dict_ema']}" if 'state_dict_ema' in result['checkpoint'] else '')
          + (f"; missing from the log: {result['log_lines']['missing']}" if result['log_lines']['missing'] else '')
          + f"; train_stim img/s {s['img_s_median']}"
          + (f" vs step benchmark {s['step_benchmark_img_s']:.1f}: {s['vs_step_benchmark']:.3f}x"
             if s.get('vs_step_benchmark') else ''))
    return 0 if result['ok'] else 1


if __name__ == '__main__':
    sys.exit(main())
