"""End-to-end tests of train_stim.py on the built-in digits data (CPU, tiny settings).

Training runs go through a subprocess (as a user would run the script); bad-input cases call
`train_stim.main(argv)` in-process, which returns the exit code the script would exit with.
"""
import csv
import os
import subprocess
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

# A few steps per epoch: 256 of the 1438 train digits (all 359 val), batch 32, one loader process.
FAST = ['--train-num-samples', '256', '--val-num-samples', '96', '-b', '32', '--workers', '0',
        '--log-interval', '2', '--device', 'cpu']


def run_env(**extra) -> dict:
    """Subprocess environment: one CPU thread, offline Hub, the repo importable."""
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1')
    env['PYTHONPATH'] = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get('PYTHONPATH')] if p])
    env.update(extra)
    return env


def run_train(*args, cwd=None, env=None, launcher=None, timeout=300) -> subprocess.CompletedProcess:
    """Run `python train_stim.py ARGS` (or `launcher + train_stim.py ARGS`) and capture its output."""
    cmd = list(launcher or [sys.executable]) + [str(REPO / 'train_stim.py')] + [str(a) for a in args]
    return subprocess.run(cmd, cwd=cwd or REPO, env=env or run_env(), capture_output=True, text=True, timeout=timeout)


def read_summary(run_dir: Path) -> list:
    with open(run_dir / 'summary.csv', newline='') as f:
        return list(csv.DictReader(f))


def load_ckpt(path: Path) -> dict:
    with torch.serialization.safe_globals([__import__('argparse').Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize('stim', ['st++', 'none'])
def test_embedded_default_one_epoch(tmp_path, stim):
    out = tmp_path / 'out'
    res = run_train('--model', 'resnet18', '--stim', stim, '--epochs', '1', '--output', out, '--experiment', 'run',
                    *FAST)
    assert res.returncode == 0, res.stderr[-3000:]
    run = out / 'run'
    for name in ('args.yaml', 'summary.csv', 'last.pth.tar', 'model_best.pth.tar'):
        assert (run / name).is_file(), name
    args = yaml.safe_load((run / 'args.yaml').read_text())
    assert args['stim'] == stim and args['dataset'] == 'digits' and args['num_classes'] == 10
    assert args['input_size'] is None and args['img_size'] == 32 and args['hflip'] == 0.0  # digits recipe applied
    rows = read_summary(run)
    assert len(rows) == 1
    timm_cols = ['epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr']  # timm's summary.csv
    stim_cols = ['train_main_loss', 'train_stim_loss', 'train_depth_frac', 'train_stim_size']
    assert list(rows[0]) == (timm_cols if stim == 'none' else timm_cols[:2] + stim_cols + timm_cols[2:])
    ckpt = load_ckpt(run / 'last.pth.tar')
    assert ckpt['epoch'] == 0 and 'rng' in ckpt['train_state']
    assert ckpt['args'].model == 'resnet18'
    if stim == 'none':
        assert 'Stim:' not in res.stdout
        assert 'task_state' not in ckpt
    else:
        for word in ('Main:', 'Stim:', 'Depth:', 'Size:', 'img/s', 'LR:', 'Step:'):
            assert word in res.stdout, word
        assert float(rows[0]['train_stim_loss']) > 0.0
        assert 'sampler' in ckpt['task_state']['stimulator']
    assert 'Acc@1' in res.stdout and 'error' not in res.stderr


@pytest.mark.slow
@pytest.mark.parametrize('stim,scope', [('st++', 'full'), ('st++', 'subnets'), ('none', 'full')])
def test_torchcompile(tmp_path, stim, scope):
    """--torchcompile (dynamo + AOT autograd, eager kernels: inductor's C++ build takes minutes here) under
    ST++ with both --stim-compile scopes and a whole-model compile under --stim none: training and
    evaluation run, and the checkpoint holds plain timm keys."""
    out = tmp_path / 'out'
    sizes = ['--stim-sizes', '24', '32'] if scope == 'subnets' else []  # a graph per (subnet, size): bucketed sizes
    res = run_train('--model', 'resnet18', '--stim', stim, '--epochs', '1', '--torchcompile', 'aot_eager',
                    '--stim-compile', scope, *sizes, '--output', out, '--experiment', 'run', *FAST)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = read_summary(out / 'run')
    assert ('train_stim_loss' in rows[0]) == (stim == 'st++') and float(rows[0]['eval_top1']) > 0.0
    assert stim == 'none' or float(rows[0]['train_stim_loss']) > 0.0
    state = load_ckpt(out / 'run' / 'last.pth.tar')['state_dict']
    assert not [k for k in state if '_orig_mod' in k or k.startswith('module.')]
    timm.create_model('resnet18', num_classes=10).load_state_dict(state)


def _bad_inputs(tmp_path):
    empty = tmp_path / 'empty_images'
    (empty / 'train' / 'cat').mkdir(parents=True)
    (empty / 'train' / 'cat' / 'notes.txt').write_text('no images here')
    bad_cfg = tmp_path / 'bad.yaml'
    bad_cfg.write_text('batch_sise: 8\n')
    return [
        (['--model', 'resnet18x'], 'unknown timm model'),
        (['--model', 'resnet14t'], 'nothing to skip'),
        (['--stim-space', '1,2,x'], 'invalid stim space'),
        (['--stim-space', '1,2,2,1,1'], 'has 4 stages'),
        (['--model', 'test_resnet'], 'never drops a block'),
        (['--stim-min-scale', '0'], '--stim-min-scale must be in (0, 1]'),
        (['--stim-min-scale', '1.5'], '--stim-min-scale must be in (0, 1]'),
        (['--stim-sizes', '16', '64'], 'stim sizes'),
        (['--data-dir', str(tmp_path / 'missing')], 'does not exist'),
        (['--data-dir', str(empty)], 'No image files'),
        (['--push-to-hub'], '--hub-repo-id'),
        (['--push-to-hub', '--hub-repo-id', 'no-owner'], 'invalid Hub repo id'),
        (['--push-to-hub', '--hub-repo-id', 'a/b'], 'HF_HUB_OFFLINE'),
        (['--resume', str(tmp_path / 'missing.pth.tar')], 'does not exist'),
        (['-c', str(bad_cfg)], "unknown key 'batch_sise'"),
        (['-c', str(REPO / 'hparams' / 'resnet50_stpp_in1k.yaml')], 'pass --data-dir'),
    ]


@pytest.mark.slow
def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    for argv, message in _bad_inputs(tmp_path):
        out = tmp_path / 'out'
        code = train_stim.main(['--model', 'resnet18'] + argv + ['--output', str(out), '--experiment', 'x',
                                                                 '--device', 'cpu'])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, (argv, err)
        assert len(err) == 1 and err[0].startswith('error: ') and message in err[0], (argv, err)
        assert not out.exists(), argv


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    # Epoch 0 trains normally; the step schedule then multiplies the lr by 1e30 and the loss blows up in epoch 1.
    out = tmp_path / 'out'
    res = run_train('--model', 'resnet18', '--epochs', '3', '--sched', 'step', '--decay-epochs', '1',
                    '--decay-rate', '1e30', '--warmup-epochs', '0', '--output', out, '--experiment', 'nan', *FAST)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: non-finite training loss') and 'epoch 1' in err[0], err
    ckpt = load_ckpt(out / 'nan' / 'last.pth.tar')
    assert ckpt['epoch'] == 0
    assert all(torch.isfinite(v).all() for v in ckpt['state_dict'].values() if v.is_floating_point())
    assert len(read_summary(out / 'nan')) == 1


@pytest.mark.slow
def test_diverged_run_saves_no_checkpoint(tmp_path):
    """--lr 1e6 blows the run up in epoch 0 (a NaN loss, or finite weights with a NaN validation loss, depending
    on the steps): exit 1, one line, and no checkpoint or summary row is written for the diverged epoch."""
    out = tmp_path / 'out'
    res = run_train('--model', 'resnet18', '--epochs', '2', '--lr', '1e6', '--warmup-epochs', '0', '--output', out,
                    '--experiment', 'lr', *FAST)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: non-finite') and 'last good checkpoint' in err[0], err
    assert not list((out / 'lr').glob('*.pth.tar')) and not (out / 'lr' / 'summary.csv').exists()


@pytest.mark.slow
def test_export_subnets_after_training(tmp_path):
    out = tmp_path / 'out'
    res = run_train('--model', 'resnet18', '--epochs', '1', '--export-subnets', '1,1,1,1', '--output', out,
                    '--experiment', 'run', *FAST)
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'Subnet d1-1-1-1:' in res.stdout
    folder = out / 'run' / 'subnets' / 'resnet18-d1-1-1-1'
    model = timm.create_model(f'local-dir:{folder}')
    assert [len(stage) for stage in (model.layer1, model.layer2, model.layer3, model.layer4)] == [1, 1, 1, 1]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
