"""Every bad input to the four command lines is one line `error: ...`, exit code 2, and writes nothing.

One table over train_stim.py, `python -m timm_stim.hub push`, `python -m timm_stim.loafing` and
`python -m timm_stim.export`; each case runs the CLI's `main(argv)` in-process (the exit code it returns is the
script's), with its own --output folder that must still not exist afterwards.
"""
import argparse
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import train_stim  # noqa: E402
from timm_stim import export, hub, loafing  # noqa: E402


class Evil:
    """A class the safe loader (torch.load weights_only=True) refuses to unpickle."""


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """Real inputs, good and bad: a run folder, a checkpoint, a pickle with code, broken configs and images."""
    root = tmp_path_factory.mktemp('inputs')
    model = timm.create_model('resnet18', num_classes=10)
    run = root / 'run'
    run.mkdir()
    torch.save({'epoch': 0, 'arch': 'resnet18', 'state_dict': model.state_dict()}, run / 'last.pth.tar')
    (run / 'args.yaml').write_text(yaml.safe_dump({'model': 'resnet18', 'num_classes': 10, 'img_size': 32}))
    evil_run = root / 'evil_run'
    evil_run.mkdir()
    torch.save({'state_dict': model.state_dict()}, evil_run / 'last.pth.tar')
    (evil_run / 'args.yaml').write_text('model: !!python/object/apply:os.system ["echo pwned"]\n')
    torch.save({'state_dict': model.state_dict(), 'extra': Evil()}, root / 'evil.pth.tar')
    (root / 'notes.txt').write_text('not a checkpoint')
    (root / 'half.pth.tar').write_bytes((run / 'last.pth.tar').read_bytes()[:5000])
    evil_dir = root / 'evil_export'  # a timm model folder whose weights are a pickle with code
    evil_dir.mkdir()
    (evil_dir / 'config.json').write_text('{"architecture": "resnet18", "num_classes": 10}')
    torch.save({'x': Evil()}, evil_dir / 'pytorch_model.bin')
    images = root / 'undecodable'
    for split in ('train', 'validation'):
        for label in ('a', 'b'):
            (images / split / label).mkdir(parents=True)
            for i in range(2):
                (images / split / label / f'{i}.png').write_bytes(b'definitely not a png')
    configs = {}
    for name, text in dict(list_batch='batch_size: [8, 16]\n', float_epochs='warmup_epochs: 2.5\n',
                           bool_weight='stim_weight: true\n', unknown='batch_sise: 8\n', not_yaml='a: [1\n',
                           not_mapping='- 1\n- 2\n', bad_choice='stim: st+++\n').items():
        configs[name] = root / f'{name}.yaml'
        configs[name].write_text(text)
    (root / 'a_file').write_text('x')
    return argparse.Namespace(root=root, run=run, evil_run=evil_run, evil=root / 'evil.pth.tar', cfg=configs,
                              notes=root / 'notes.txt', half=root / 'half.pth.tar', evil_dir=evil_dir,
                              images=images, a_file=root / 'a_file')


T = 'train_stim.py'
H, L, E = 'hub', 'loafing', 'export'
MAINS = {T: train_stim.main, H: hub.main, L: loafing.main, E: export.main}
TRAIN = ['--model', 'resnet18', '--device', 'cpu', '--epochs', '1', '--workers', '0']


def _cases(f):
    """(cli, argv, words in the message); '{out}' is the case's output folder."""
    run, ckpt = str(f.run), str(f.run / 'last.pth.tar')
    cases = [
        # every option's type and range
        (T, ['--lr', 'nan'], '--lr must be a finite number'),
        (T, ['--lr', 'inf'], '--lr must be a finite number'),
        (T, ['--lr', '-0.1'], '--lr must be >= 0'),
        (T, ['--workers', '-1'], '--workers must be >= 0'),
        (T, ['-b', '0'], '--batch-size must be >= 1'),
        (T, ['--epochs', '0'], '--epochs must be >= 1'),
        (T, ['--epochs', '2.5'], "invalid int value: '2.5'"),
        (T, ['--num-classes', '0'], '--num-classes must be >= 1'),
        (T, ['--num-classes', '-1'], '--num-classes must be >= 1'),
        (T, ['--checkpoint-hist', '0'], '--checkpoint-hist must be >= 1'),
        (T, ['--start-epoch', '-3'], '--start-epoch must be >= 0'),
        (T, ['--stim-weight', 'nan'], '--stim-weight must be a finite number'),
        (T, ['--stim-temperature', 'inf'], '--stim-temperature must be a finite number'),
        (T, ['--stim-weight', '0'], '--stim-weight must be > 0'),
        (T, ['--stim-bn-recal', '-5'], '--stim-bn-recal must be >= 0'),
        (T, ['--stim-subnets', '0'], '--stim-subnets must be >= 1'),
        (T, ['--smoothing', '1.5'], '--smoothing must be < 1'),
        (T, ['--drop-path', '-0.1'], '--drop-path must be in [0, 1]'),
        (T, ['--mean', '0.5', '0.5'], '--mean needs 1 value or one per input channel'),
        (T, ['--std', '0', '1', '1'], '--std must be > 0'),
        (T, ['--input-size', '3', '0', '0'], '--input-size must be C H W'),
        (T, ['--img-size', '1'], '--img-size must be >= 8'),
        (T, ['--opt', 'sgdd'], '--opt must be a timm optimizer'),
        (T, ['--sched', 'cosin'], '--sched must be one of'),
        (T, ['--sched', 'plateau', '--sched-on-updates'], '--sched-on-updates cannot be used with --sched plateau'),
        (T, ['--device', 'cuda:7'], '--device cuda:7'),
        (T, ['--device', 'toaster'], 'is not a torch device'),
        (T, ['--scale', '0.9', '0.1'], '--scale must be two numbers, low high'),
        (T, ['--decay-milestones', '30', '10'], '--decay-milestones must be increasing'),
        (T, ['--eval-metric', 'top3'], '--eval-metric must be'),
        (T, ['--stim', 'st+++'], "invalid choice: 'st+++'"),
        (T, ['--no-such-flag'], 'unrecognized arguments: --no-such-flag'),
        (T, ['--model', 'resnet18x'], 'unknown timm model'),
        (T, ['--export-subnets', '1,x'], '--export-subnets: invalid depth vector'),
        (T, ['--export-subnets', 'pareto:0'], 'pareto:N needs N >= 1'),
        # configs of the wrong type
        (T, ['-c', str(f.cfg['list_batch']), '--data-dir', str(f.images)], '--batch-size must be int'),
        (T, ['-c', str(f.cfg['float_epochs'])], '--warmup-epochs must be int'),
        (T, ['-c', str(f.cfg['bool_weight'])], '--stim-weight must be float'),
        (T, ['-c', str(f.cfg['unknown'])], "unknown key 'batch_sise'"),
        (T, ['-c', str(f.cfg['not_yaml'])], 'is not valid YAML'),
        (T, ['-c', str(f.cfg['not_mapping'])], 'must map argument names to values'),
        (T, ['-c', str(f.cfg['bad_choice'])], "'st+++' in config"),
        (T, ['-c', str(f.root / 'missing.yaml')], 'cannot read config'),
        # run names and output folders
        (T, ['--experiment', '../escape'], '--experiment must be one folder name'),
        (T, ['--experiment', '/tmp/absolute'], '--experiment must be one folder name'),
        (T, ['--experiment', '..'], '--experiment must be one folder name'),
        (T, ['--experiment', 'a/b'], '--experiment must be one folder name'),
        (T, ['--output', str(f.a_file / 'sub')], 'is a file, not a folder'),
        (T, ['--output', '/proc/timm_stim_out'], 'choose a writable --output'),
        # files: checkpoints, pickles, data
        (T, ['--resume', str(f.notes)], 'not a PyTorch checkpoint'),
        (T, ['--resume', run], 'is a folder; pass the checkpoint file inside it'),
        (T, ['--resume', str(f.evil)], 'refuses to unpickle'),
        (T, ['--resume', str(f.half)], 'cannot read checkpoint'),
        (T, ['--resume', str(f.root / 'missing.pth.tar')], 'does not exist'),
        (T, ['--initial-checkpoint', str(f.root / 'missing.pth')], 'does not exist'),
        (T, ['--data-dir', str(f.root / 'missing')], 'does not exist'),
        (T, ['--data-dir', str(f.images), '--stim', 'none'], 'cannot read the first training image'),
        (T, ['--push-to-hub', '--hub-repo-id', 'no-owner'], 'invalid Hub repo id'),
        (T, ['--push-to-hub', '--hub-repo-id', 'a/b'], 'HF_HUB_OFFLINE'),
        # python -m timm_stim.hub push
        (H, ['push', run, '--hub-repo-id', 'bad id'], 'invalid Hub repo id'),
        (H, ['push', run], 'the following arguments are required: --hub-repo-id'),
        (H, ['pull', run], "invalid choice: 'pull'"),
        (H, ['push', str(f.root / 'nothing'), '--hub-repo-id', 'a/b'], 'does not exist'),
        (H, ['push', str(f.notes), '--hub-repo-id', 'a/b'], 'not a PyTorch checkpoint'),
        (H, ['push', str(f.evil), '--model', 'resnet18', '--hub-repo-id', 'a/b'], 'refuses to unpickle'),
        (H, ['push', str(f.evil_run), '--hub-repo-id', 'a/b'], 'cannot read'),
        (H, ['push', run, '--num-classes', '0', '--hub-repo-id', 'a/b'], '--num-classes must be >= 1'),
        (H, ['push', run, '--model', 'resnet18x', '--hub-repo-id', 'a/b'], 'unknown timm model'),
        (H, ['push', run, '--hub-repo-id', 'a/b', '--model-kwargs', 'oops'], 'key=value'),
        (H, ['push', run, '--hub-repo-id', 'a/b'], 'HF_HUB_OFFLINE'),
        # python -m timm_stim.loafing
        (L, [ckpt, '--bn-recal', '-1'], '--bn-recal must be >= 0'),
        (L, [ckpt, '-b', '0'], '--batch-size must be >= 1'),
        (L, [ckpt, '--img-size', '1'], '--img-size must be >= 8'),
        (L, [ckpt, '--mean', '0.5', '0.5'], '--mean needs 1 or 3 values'),
        (L, [ckpt, '--crop-pct', 'nan'], '--crop-pct must be a finite number'),
        (L, [ckpt, '--depths', '1,x'], 'invalid depth vector'),
        (L, [ckpt, '--subnets', 'random:x'], '--subnets'),
        (L, [str(f.root / 'nothing.pth')], 'does not exist'),
        (L, [str(f.evil), '--model', 'resnet18'], 'refuses to unpickle'),
        (L, [f'local-dir:{f.evil_dir}'], 'cannot load'),
        (L, [str(f.evil_run)], 'cannot read'),
        (L, [ckpt, '--workers'], 'expected one argument'),
        # python -m timm_stim.export
        (E, [run], 'no subnet requested'),
        (E, [run, '--depths', '1,1,x'], 'invalid depth vector'),
        (E, [run, '--keep', '12'], 'invalid keep-mask'),
        (E, [run, '--depths', '1,1,1,1', '--latency-repeats', '0'], '--latency-repeats must be >= 1'),
        (E, [run, '--pareto', '-1'], '--pareto must be >= 0'),
        (E, [run, '--depths', '1,1,1,1', '--push-to-hub'], '--push-to-hub needs --hub-repo-id'),
        (E, [str(f.notes), '--depths', '1,1,1,1'], 'not a PyTorch checkpoint'),
        (E, [f'local-dir:{f.evil_dir}', '--depths', '1,1,1,1'], 'cannot load'),
        (E, [run, '--depths', '1,1,1,1', '--output', str(f.a_file / 'x')], 'is a file, not a folder'),
        (E, [run, '--depths', '1,1,1,1', '--img-size', '0'], '--img-size must be >= 8'),
    ]
    return cases


def test_table_has_enough_cases(files):
    cases = _cases(files)
    assert len(cases) >= 60 and {c[0] for c in cases} == set(MAINS)


@pytest.mark.slow
def test_every_bad_input_is_one_line_exit_2_and_writes_nothing(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(hub.hf_constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.chdir(tmp_path)  # a default output folder would appear here
    before = sorted(p.name for p in files.root.rglob('*'))
    failures = []
    for i, (cli, argv, words) in enumerate(_cases(files)):
        out = tmp_path / f'out{i}'
        has_output = '--output' in argv
        full = list(argv) + ([] if has_output else ['--output', str(out)])
        if cli == T:
            full = TRAIN + full + ([] if '--experiment' in argv else ['--experiment', 'run'])
        try:
            code = MAINS[cli](full)
        except SystemExit as e:  # only --help may exit this way
            code = f'SystemExit({e.code})'
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        ok = (code == 2 and len(lines) == 1 and lines[0].startswith('error: ') and words in lines[0]
              and 'Traceback' not in captured.err + captured.out and not out.exists())
        if not ok:
            failures.append((cli, argv, code, lines[-3:]))
    assert not failures, '\n'.join(map(str, failures))
    assert sorted(p.name for p in files.root.rglob('*')) == before  # nothing written next to the inputs
    assert not list(tmp_path.iterdir())
