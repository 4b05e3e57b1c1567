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
    raw = dict(binary=bytes(range(256)) * 4, latin1='model: r\xe9snet18\n'.encode('latin-1'),
               huge=b'# ' + b'x' * (2 << 20) + b'\n', deep=b'model_kwargs: {x: ' + b'[' * 50000 + b']' * 50000 + b'}\n',
               bad_date=b'model: 2021-02-30\n')
    laughs = ['l0: &l0 [x, x, x, x, x, x, x, x, x]']  # 'billion laughs': 9**9 values through anchors and aliases
    laughs += [f'l{i}: &l{i} [' + ', '.join([f'*l{i - 1}'] * 9) + ']' for i in range(1, 9)]
    raw['bomb'] = ('\n'.join(laughs) + '\nmodel_kwargs: {x: *l8}\n').encode()
    for name, data in raw.items():
        configs[name] = root / f'{name}.yaml'
        configs[name].write_bytes(data)
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
        # ranges of numeric flags timm leaves unchecked (one RULES row each)
        (T, ['--seed', '-1'], '--seed must be in [0, 4294967295]'),
        (T, ['--seed', str(2 ** 32)], '--seed must be in [0, 4294967295]'),
        (T, ['--crop-pct', '0'], '--crop-pct must be in (0, 1]'),
        (T, ['--opt-eps', '-1'], '--opt-eps must be > 0'),
        (T, ['--opt-eps', '0'], '--opt-eps must be > 0'),
        (T, ['--opt', 'adamw', '--opt-betas', '0.9'], '--opt-betas needs 2 values for --opt adamw'),
        (T, ['--opt', 'adan', '--opt-betas', '0.9', '0.9'], '--opt-betas needs 3 values for --opt adan'),
        (T, ['--opt-betas', '0.9', '1.0'], '--opt-betas must be 1 to 3 values, each in [0, 1)'),
        (T, ['--momentum', '1.5'], '--momentum must be in [0, 1)'),
        (T, ['--opt', 'sgd', '--momentum', '0'], '--momentum must be > 0: --opt sgd uses Nesterov momentum'),
        (T, ['--ratio', '0', '0'], '--ratio must be > 0'),
        (T, ['--scale', '-1', '1'], '--scale must be > 0'),
        (T, ['--scale', '0.5', '2'], '--scale must be <= 1 with the random-resized crop'),
        (T, ['--lr-cycle-mul', '-2'], '--lr-cycle-mul must be > 0'),
        (T, ['--lr-cycle-decay', '2'], '--lr-cycle-decay must be in [0, 1]'),
        (T, ['--lr-k-decay', '0'], '--lr-k-decay must be > 0'),
        (T, ['--decay-rate', '-0.1'], '--decay-rate must be > 0'),
        (T, ['--sched', 'poly', '--decay-rate', '0'], '--decay-rate must be > 0'),
        (T, ['--decay-epochs', '0'], '--decay-epochs must be > 0'),
        (T, ['--lr-noise', '40', '60'], '--lr-noise must be 1 or 2 fractions of the schedule'),
        (T, ['--lr-noise-pct', '0'], '--lr-noise-pct must be in (0, 1]'),
        (T, ['--lr-noise-std', '-1'], '--lr-noise-std must be > 0'),
        (T, ['--lr', '0.01', '--min-lr', '0.1'], '--min-lr must be <= --lr 0.01'),
        (T, ['--bn-momentum', '5'], '--bn-momentum must be in [0, 1]'),
        (T, ['--bn-eps', '0'], '--bn-eps must be > 0'),
        (T, ['--color-jitter', '-1'], '--color-jitter must be >= 0'),
        (T, ['--clip-grad', '0'], '--clip-grad must be > 0'),
        (T, ['--cutmix-minmax', '0.5', '0.5'], '--cutmix-minmax must be two fractions'),
        (T, ['--layer-decay-no-opt-scale', '2'], '--layer-decay-no-opt-scale must be in [0, 1]'),
        (T, ['--sched', 'plateau', '--decay-rate', '1'], '--decay-rate must be < 1 with --sched plateau'),
        (T, ['--lr-noise', '0.9', '0.1'], 'on < off'),
        (T, ['--bce-target-thresh', '1'], '--bce-target-thresh must be in [0, 1)'),
        (T, ['--bce-pos-weight', '0'], '--bce-pos-weight must be > 0'),
        (T, ['--kd-student-feature-dim', '0'], '--kd-student-feature-dim must be >= 1'),
        (T, ['--local_rank', '-1'], '--local_rank must be >= 0'),
        (T, ['--aug-repeats', '1000'], '--aug-repeats must be <= 100'),
        (T, ['--num-classes', '100000000'], '--num-classes must be <= 10000000'),
        (T, ['--tta', '3', '-b', '64'], '--tta must divide the validation batch size 64'),
        # upper bounds where a value can only be a mistake
        (T, ['--stim-subnets', '1000000000'], '--stim-subnets must be <= 256'),
        (T, ['--img-size', '100000'], '--img-size must be <= 4096'),
        (T, ['--input-size', '3', '9000', '9000'], '--input-size must have H, W <= 4096'),
        (T, ['--stim-sizes', '10000'], '--stim-sizes must all be <= 4096'),
        (T, ['--train-img-sizes', '10000'], '--train-img-sizes must all be <= 4096'),
        (T, ['--workers', '100000'], '--workers must be <= 256'),
        (T, ['-b', '1000000000'], '--batch-size must be <= 100000'),
        (T, ['--epochs', '1000000000'], '--epochs must be <= 1000000'),
        (T, ['--warmup-epochs', '1000000000'], '--warmup-epochs must be <= 1000000'),
        (T, ['--epochs', '100', '--lr-cycle-mul', '2', '--lr-cycle-limit', '100'], 'at most 1000000 can run'),
        (T, ['--recount', '1000000'], '--recount must be <= 100'),
        # string flags with a fixed vocabulary, checked against timm's and torch's own tables and parsers
        (T, ['--interpolation', 'bogus'], '--interpolation bogus is not an interpolation timm knows'),
        (T, ['--interpolation', 'random'], 'random is for --train-interpolation only'),
        (T, ['--train-interpolation', 'bogus'], '--train-interpolation bogus is not an interpolation'),
        (T, ['--torchcompile', 'no_such_backend'], '--torchcompile must be a torch.compile backend'),
        (T, ['--torchcompile', '--torchcompile-mode', 'bogus'], '--torchcompile-mode must be a torch.compile mode'),
        (T, ['--aa', 'bogus-policy'], '--aa is not a policy timm can parse'),
        (T, ['--aa', 'rand-m9-zz'], "--aa has section 'zz' without a number, which timm would silently ignore"),
        (T, ['--aa', 'augmix-m3-zz'], "--aa has section 'zz' without a number"),
        (T, ['--aa', 'rand-m9-m5'], "--aa gives section 'm' twice"),
        (T, ['--aa', 'rand-m30'], '--aa has magnitude m30, above 10'),
        (T, ['--aa', 'rand-m9-tfoo'], "--aa has transform set 'tfoo'"),
        (T, ['--aa', 'rand--m9'], '--aa has an empty section'),
        (T, ['--aa', 'rand-m9-p2'], '--aa has probability p2'),
        (T, ['--train-crop-mode', 'bogus'], '--train-crop-mode must be'),
        (T, ['--fuser', 'bogus'], '--fuser must be'),
        (T, ['--input-img-mode', 'BOGUS'], '--input-img-mode must be a PIL image mode'),
        (T, ['--hub-revision', 'bad..rev'], "--hub-revision 'bad..rev' is not a valid branch name"),
        (T, ['--device-modules', 'no_such_module_xyz'], '--device-modules must name importable Python modules'),
        # timm.create_model's common kwargs
        (T, ['--model-kwargs', 'drop_rate=abc'], "--model-kwargs drop_rate=abc: timm.create_model's drop_rate is set "
                                                 "by --drop (a number in [0, 1])"),
        (T, ['--model-kwargs', 'img_size=abc'], '--model-kwargs img_size=abc: timm.create_model takes an integer'),
        (T, ['--model-kwargs', 'checkpoint_path=/etc/passwd'], 'use --initial-checkpoint instead'),
        # configs of the wrong type
        (T, ['-c', str(f.cfg['list_batch']), '--data-dir', str(f.images)], '--batch-size must be int'),
        (T, ['-c', str(f.cfg['float_epochs'])], '--warmup-epochs must be int'),
        (T, ['-c', str(f.cfg['bool_weight'])], '--stim-weight must be float'),
        (T, ['-c', str(f.cfg['unknown'])], "unknown key 'batch_sise'"),
        (T, ['-c', str(f.cfg['not_yaml'])], 'is not valid YAML'),
        (T, ['-c', str(f.cfg['not_mapping'])], 'must map argument names to values'),
        (T, ['-c', str(f.cfg['bad_choice'])], "'st+++' in config"),
        (T, ['-c', str(f.root / 'missing.yaml')], 'cannot read config'),
        (T, ['-c', str(f.cfg['binary'])], 'is a binary file, not a YAML of flags'),
        (T, ['-c', str(f.cfg['latin1'])], 'is not UTF-8 text'),
        (T, ['-c', str(f.cfg['huge'])], 'is larger than 1 MiB'),
        (T, ['-c', str(f.cfg['bomb'])], 'expands to more than 100000 values'),
        (T, ['-c', str(f.cfg['deep'])], 'nests too deeply'),
        (T, ['-c', str(f.cfg['bad_date'])], 'is not valid YAML'),
        (T, ['-c', str(f.root)], 'cannot read config'),
        # run names and output folders
        (T, ['--experiment', '../escape'], '--experiment must be one folder name'),
        (T, ['--experiment', '/tmp/absolute'], '--experiment must be one folder name'),
        (T, ['--experiment', '..'], '--experiment must be one folder name'),
        (T, ['--experiment', 'a/b'], '--experiment must be one folder name'),
        (T, ['--output', str(f.a_file / 'sub')], 'is a file, not a folder'),
        (T, ['--output', '/proc/timm_stim_out'], 'choose a writable --output'),
        (T, ['--experiment', 'x' * 10_000], '--experiment is 10000 bytes, longer than the 255'),
        (T, ['--output', '{out}/' + 'y' * 300 + '/z'], 'longer than this file system allows'),
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
        (H, ['push', run, '--hub-repo-id', 'a/b', '--model-kwargs', 'drop_rate=abc'], 'takes a number in [0, 1]'),
        (H, ['push', run, '--hub-repo-id', 'a/b', '--hub-revision', 'bad..rev'], 'is not a valid branch name'),
        (H, ['push', run, '--hub-repo-id', 'a/b', '--commit-message', ' '], '--commit-message must not be empty'),
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
        (L, [ckpt, '--depths', '9,9,9,9'], 'is out of range'),  # found after the model loads: no info line before
        (L, [ckpt, '--space', 'bogus'], '--space: invalid stim space'),
        (L, [ckpt, '--interpolation', 'bogus'], '--interpolation bogus is not an interpolation'),
        (L, [ckpt, '--device', 'toaster'], 'is not a torch device'),
        (L, [ckpt, '--model-kwargs', 'drop_rate=abc'], 'takes a number in [0, 1] for drop_rate'),
        (L, [ckpt, '--model-kwargs', 'global_pool=bogus'], 'cannot build the models'),
        (L, [ckpt, '--seed', '-1'], '--seed must be >= 0'),
        (L, [ckpt, '--workers', '100000'], '--workers must be <= 256'),
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
        (E, [run, '--depths', '1,1,1,1', '--interpolation', 'bogus'], 'is not an interpolation timm knows'),
        (E, [run, '--depths', '1,1,1,1', '--model-kwargs', 'drop_rate=abc'], 'takes a number in [0, 1]'),
        (E, [run, '--depths', '1,1,1,1', '--device', 'toaster'], 'is not a torch device'),
    ]
    return cases


def test_table_has_enough_cases(files):
    cases = _cases(files)
    assert len(cases) >= 180 and {c[0] for c in cases} == set(MAINS)


def _failure(cli, argv, words, out, capsys):
    """None when `cli` refuses `argv` as bad input should be refused, else what went wrong: exit code 2, exactly one
    line on stderr (`error: ...` naming the problem; no progress or info line before it), no traceback anywhere,
    and the case's output folder not created."""
    argv = [a.replace('{out}', str(out)) for a in argv]
    full = list(argv) + ([] if '--output' in argv else ['--output', str(out)])
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
    return None if ok else (cli, argv[:6], code, lines[-3:], 'output exists' if out.exists() else '')


@pytest.mark.slow
def test_every_bad_input_is_one_line_exit_2_and_writes_nothing(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(hub.hf_constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.chdir(tmp_path)  # a default output folder would appear here
    before = sorted(p.name for p in files.root.rglob('*'))
    failures = [_failure(cli, argv, words, tmp_path / f'out{i}', capsys)
                for i, (cli, argv, words) in enumerate(_cases(files))]
    failures = [f for f in failures if f]
    assert not failures, '\n'.join(map(str, failures))
    assert sorted(p.name for p in files.root.rglob('*')) == before  # nothing written next to the inputs
    assert not list(tmp_path.iterdir())


def test_hub_push_checks_the_model_before_any_progress_line(files, tmp_path, capsys, monkeypatch):
    """With a push that could work (token, online), a model that does not fit the checkpoint is still bad input:
    exit 2 and one line, found before the export starts (no 'loaded' / 'exported to' line, no hf_export folder)."""
    monkeypatch.setattr(hub, 'check_can_push', lambda token=None: None)
    run = str(files.run)
    before = sorted(p.name for p in files.root.rglob('*'))
    cases = [(['push', run, '--hub-repo-id', 'a/b', '--model', 'resnet34'], 'does not match'),
             (['push', run, '--hub-repo-id', 'a/b', '--num-classes', '5'], 'shape mismatch'),
             (['push', run, '--hub-repo-id', 'a/b', '--model-kwargs', 'global_pool=bogus'], 'cannot build the model')]
    failures = [_failure(H, argv, words, tmp_path / f'out{i}', capsys) for i, (argv, words) in enumerate(cases)]
    assert not [f for f in failures if f], failures
    assert sorted(p.name for p in files.root.rglob('*')) == before


def test_every_numeric_flag_has_a_range_rule():
    """The validation table covers every int / float flag of train_stim.py: a new flag needs a row in RULES (or a
    reason here why every finite value is valid)."""
    from timm_stim.train_args import RULES, build_parser
    any_finite_value = {'mean', 'head_init_scale', 'head_init_bias'}  # any finite number is a valid choice
    covered = {dest for rule in RULES for dest in rule.dests}
    numeric = {a.dest for a in build_parser()._actions if a.type in (int, float)}
    assert not numeric - covered - any_finite_value


def test_output_folder_check_creates_nothing(tmp_path):
    from timm_stim.cli import UsageError, check_output_folder
    target = tmp_path / 'a' / 'b' / 'c'
    check_output_folder(str(target))
    with pytest.raises(UsageError, match='longer than this file system allows'):
        check_output_folder(str(tmp_path / 'a' / ('n' * 300) / 'c'))
    assert not list(tmp_path.iterdir())
