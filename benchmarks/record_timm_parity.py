#!/usr/bin/env python3
"""Record what tests/test_timm_parity.py checks train_stim.py against: timm's own train.py.

    OMP_NUM_THREADS=1 python benchmarks/record_timm_parity.py --timm-train /path/to/timm/train.py

1. Writes a small PNG image folder of the built-in digits (train/ and validation/, one sub-folder per class,
   deterministic: the first N images of each class in timm_stim.data.DigitsDataset order).
2. Writes the distillation teachers (TEACHERS: timm model folders with weights from a fixed seed, for
   `--kd-model-name local-dir:...`).
3. Runs timm's train.py on it on CPU for each config in CONFIGS (2 epochs of resnet10t at 32 px unless a config
   names another model, one loader process, one thread) and records every summary.csv row ->
   tests/data/timm_parity.json, with the exact command, the timm / torch / Python versions and the date.
4. Records every flag of timm's train.py (option strings, dest, default) -> tests/data/timm_flags.json, by
   building its parser (importing the script runs no training).
5. Keeps the args.yaml timm wrote for the first config -> tests/data/timm_args.yaml (a real timm args.yaml that
   train_stim.py -c must accept unchanged).

The test writes the same folders with `write_digits_folder` / `write_teacher_folders` and runs
`train_stim.py --stim none` with the same flags.
"""
import argparse
import csv
import datetime
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / 'tests' / 'data'

# Per split, images per class: small enough for a CPU test, large enough for several updates per epoch.
PER_CLASS = {'train': 30, 'validation': 10}

# Shared by every config: tiny model, CPU, deterministic loading (no worker processes), 2 epochs.
COMMON = ['--model', 'resnet10t', '--img-size', '32', '--epochs', '2', '-b', '32', '--workers', '0',
          '--device', 'cpu', '--seed', '7', '--log-interval', '100', '--checkpoint-hist', '1']
CONFIGS = {
    'sgd_cosine': ['--opt', 'sgd', '--lr', '0.05', '--weight-decay', '1e-4', '--sched', 'cosine',
                   '--warmup-epochs', '1', '--smoothing', '0'],
    'mixup_smoothing_ema': ['--opt', 'sgd', '--lr', '0.05', '--mixup', '0.2', '--cutmix', '0.5', '--smoothing',
                            '0.1', '--model-ema', '--model-ema-decay', '0.9', '--sched', 'multistep',
                            '--decay-milestones', '1', '--warmup-epochs', '0'],
    'adamw_accum_clip_reprob_droppath': ['--opt', 'adamw', '--lr', '2e-3', '--weight-decay', '0.05',
                                         '--grad-accum-steps', '2', '--clip-grad', '1.0', '--reprob', '0.25',
                                         '--drop-path', '0.1', '--sched', 'cosine', '--sched-on-updates',
                                         '--warmup-epochs', '1'],
    # 3-step accumulation (with a shorter last accumulation): the logged loss is timm's divided float32 loss x 3
    'sgd_accum3': ['--opt', 'sgd', '--lr', '0.05', '--sched', 'cosine', '--warmup-epochs', '0',
                   '--grad-accum-steps', '3'],
    # timm's scheduled-resolution loader: two sizes, two batch sizes, per-batch linear loss scale
    'scheduled_sizes': ['--opt', 'sgd', '--lr', '0.05', '--sched', 'cosine', '--warmup-epochs', '0',
                        '--train-img-sizes', '24', '32', '--train-batch-sizes', '48', '32',
                        '--variable-batch-loss-scale', 'linear'],
    # knowledge distillation from the teachers write_teacher_folders makes ({teachers} = their folder)
    'kd_logit': ['--opt', 'sgd', '--lr', '0.05', '--sched', 'cosine', '--warmup-epochs', '0',
                 '--kd-model-name', 'local-dir:{teachers}/resnet10t', '--task-loss-weight', '0.5',
                 '--kd-temperature', '2'],
    'kd_feature_projection': ['--opt', 'adamw', '--lr', '1e-3', '--weight-decay', '0.05', '--sched', 'cosine',
                              '--warmup-epochs', '0', '--kd-model-name', 'local-dir:{teachers}/vit',
                              '--kd-distill-type', 'feature', '--distill-loss-weight', '0.5'],
    'kd_token': ['--model', 'deit_tiny_distilled_patch16_224', '--model-kwargs', 'depth=2', 'img_size=32',
                 '--opt', 'adamw', '--lr', '1e-3', '--sched', 'cosine', '--warmup-epochs', '0',
                 '--kd-model-name', 'local-dir:{teachers}/resnet10t', '--kd-distill-type', 'token'],
    # timm's NaFlex loader (patch sequences of 4 and 16 patches) on a small NaFlex ViT
    'naflex': ['--model', 'naflexvit_base_patch16_gap', '--model-kwargs', 'embed_dim=64', 'depth=2', 'num_heads=2',
               '--opt', 'adamw', '--lr', '1e-3', '--sched', 'cosine', '--warmup-epochs', '0', '--naflex-loader',
               '--naflex-train-seq-lens', '4', '16', '--naflex-max-seq-len', '4'],
}

# Distillation teachers: (architecture, timm.create_model kwargs), weights from a fixed seed.
TEACHERS = {'resnet10t': ('resnet10t', {}), 'vit': ('vit_tiny_patch16_224', dict(img_size=32, depth=2))}


def write_digits_folder(root, per_class: dict = None) -> Path:
    """The first `per_class[split]` digits of each class as RGB PNGs in root/<split>/<class>/NNNN.png."""
    from timm_stim.data import DigitsDataset
    root = Path(root)
    for split, count in (per_class or PER_CLASS).items():
        dataset, written = DigitsDataset(split=split, img_size=32), {}
        for index in range(len(dataset)):
            image, label = dataset[index]
            if written.get(label, 0) >= count:
                continue
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f'{index:04d}.png')
            written[label] = written.get(label, 0) + 1
    return root


def write_teacher_folders(root) -> Path:
    """Each TEACHERS model (10 classes, seed 0) as a timm model folder root/<name>, for local-dir: names."""
    import timm
    import torch
    from timm.models import save_for_hf
    root = Path(root)
    for name, (arch, kwargs) in TEACHERS.items():
        torch.manual_seed(0)
        model = timm.create_model(arch, num_classes=10, **kwargs)
        save_for_hf(model, str(root / name), model_config=dict(num_classes=10, **kwargs))
    return root


def config_flags(flags: list, teachers) -> list:
    """A config's flags with {teachers} replaced by the teacher folder."""
    return [flag.replace('{teachers}', str(teachers)) for flag in flags]


def read_summary(path) -> list:
    """summary.csv rows with every value as a float."""
    with open(path, newline='') as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def timm_flags(train_py: str) -> list:
    """Every argument of timm's train.py parser: option strings, dest, default (as JSON)."""
    spec = importlib.util.spec_from_file_location('timm_train_reference', train_py)
    module = importlib.util.module_from_spec(spec)
    argv, sys.argv = sys.argv, [train_py]
    try:
        spec.loader.exec_module(module)  # builds the parsers; main() only runs under __main__
    finally:
        sys.argv = argv
    flags = []
    for action in module.parser._actions:
        if action.dest == 'help':
            continue
        default = action.default
        flags.append(dict(options=list(action.option_strings), dest=action.dest,
                          default=list(default) if isinstance(default, tuple) else default,
                          nargs=action.nargs if not isinstance(action.nargs, int) else int(action.nargs)))
    return flags


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--timm-train', required=True, help="timm's train.py")
    p.add_argument('--out', default=str(DATA), help='where to write the JSON / YAML records')
    args = p.parse_args(argv)
    import numpy
    import PIL
    import timm
    import torch
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1')
    record = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                  timm=timm.__version__, torch=torch.__version__, python=platform.python_version(),
                  pillow=PIL.__version__, numpy=numpy.__version__,  # image decoding / resizing change the numbers
                  machine=platform.machine(), timm_train=os.path.basename(args.timm_train),
                  per_class=PER_CLASS, common=COMMON, configs={})
    with tempfile.TemporaryDirectory() as tmp:
        data = write_digits_folder(Path(tmp) / 'digits')
        teachers = write_teacher_folders(Path(tmp) / 'teachers')
        for name, flags in CONFIGS.items():
            cmd = [sys.executable, args.timm_train, '--data-dir', str(data), *COMMON, *config_flags(flags, teachers),
                   '--output', str(Path(tmp) / 'out'), '--experiment', name]
            print('$ OMP_NUM_THREADS=1', ' '.join(cmd[1:]), flush=True)
            subprocess.run(cmd, env=env, check=True, cwd=Path(args.timm_train).parent)
            run = Path(tmp) / 'out' / name
            record['configs'][name] = dict(
                flags=flags, summary=read_summary(run / 'summary.csv'),
                command='OMP_NUM_THREADS=1 python train.py --data-dir DIGITS ' + ' '.join(COMMON + flags))
            if name == next(iter(CONFIGS)):
                shutil.copy(run / 'args.yaml', out / 'timm_args.yaml')
    (out / 'timm_parity.json').write_text(json.dumps(record, indent=1) + '\n')
    flags = timm_flags(args.timm_train)
    (out / 'timm_flags.json').write_text(json.dumps(dict(timm=timm.__version__, source=record['timm_train'],
                                                         flags=flags), indent=1) + '\n')
    print(f'wrote {out}/timm_parity.json ({len(CONFIGS)} configs), timm_flags.json ({len(flags)} arguments), '
          f'timm_args.yaml')
    return 0


if __name__ == '__main__':
    sys.exit(main())
