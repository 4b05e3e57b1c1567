"""A real training run killed with SIGKILL at several points, then resumed: every file stays usable and the
resumed run ends exactly where the uninterrupted one does.

The kill points are exact: a small driver runs train_stim.main in a subprocess with one function wrapped to
SIGKILL its own process at the chosen moment of epoch 1 (of 3):
  * validate     - during evaluation (nothing of epoch 1 written yet)
  * summary      - after epoch 1's summary.csv row, before its checkpoint is published
  * torch.save   - half-way through writing epoch 1's checkpoint (tmp file, half written)
  * publish      - after last.pth.tar of epoch 1 was replaced, before checkpoint-1 / model_best
After each kill the run resumes (--resume <run>/last.pth.tar --experiment <run>) and is checked: every
*.pth.tar loads with weights_only and holds finite weights, summary.csv has epochs 0, 1, 2 once each with the
uninterrupted run's values, and the final weights equal the uninterrupted run's bit for bit.
"""
import csv
import sys

import pytest
import torch

from test_train_stim import FAST, load_ckpt, run_env, REPO

RECIPE = ['--model', 'resnet18', '--stim', 'st++', '--epochs', '3', '--train-num-samples', '64', '--checkpoint-hist',
          '2', *[a for a in FAST if a not in ('--train-num-samples', '256')]]

DRIVER = r'''
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import torch
import train_stim
point, kill_epoch = sys.argv[2], int(sys.argv[3])
state = {'epoch': -1}

def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)

train_one_epoch = train_stim.train_one_epoch
def tracked(epoch, *args, **kwargs):
    state['epoch'] = epoch
    return train_one_epoch(epoch, *args, **kwargs)
train_stim.train_one_epoch = tracked

if point == 'validate':
    validate = train_stim.validate
    def killing_validate(*args, **kwargs):
        if state['epoch'] == kill_epoch:
            die()
        return validate(*args, **kwargs)
    train_stim.validate = killing_validate
elif point == 'summary':
    write_row = train_stim.write_summary_row
    def killing_row(filename, epoch, *args, **kwargs):
        write_row(filename, epoch, *args, **kwargs)
        if epoch == kill_epoch:
            die()
    train_stim.write_summary_row = killing_row
elif point == 'torch.save':
    save = torch.save
    def killing_save(obj, path, *args, **kwargs):
        if isinstance(obj, dict) and obj.get('epoch') == kill_epoch:
            with open(path, 'wb') as f:
                f.write(b'PK\x03\x04 half a checkpoint')
            die()
        return save(obj, path, *args, **kwargs)
    torch.save = killing_save
elif point == 'publish':
    replace = train_stim.AtomicCheckpointSaver._replace
    def killing_replace(self, src, dst):
        replace(self, src, dst)
        if dst.endswith('last.pth.tar') and state['epoch'] == kill_epoch:
            die()
    train_stim.AtomicCheckpointSaver._replace = killing_replace
sys.exit(train_stim.main(sys.argv[4:]))
'''


def _driver(point, *args):
    import subprocess
    cmd = [sys.executable, '-c', DRIVER, str(REPO), point, '1'] + [str(a) for a in args]
    return subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)


def _rows(run):
    with open(run / 'summary.csv', newline='') as f:
        return list(csv.DictReader(f))


def _check_files(run):
    for path in sorted(p for p in run.glob('*.pth.tar') if not p.name.startswith('tmp')):  # tmp: never read
        ckpt = load_ckpt(path)  # weights_only: loadable, not half written
        for name, tensor in ckpt['state_dict'].items():
            assert not tensor.is_floating_point() or torch.isfinite(tensor).all(), (path, name)


@pytest.mark.slow
def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path):
    out = tmp_path / 'out'
    full = _driver('none', *RECIPE, '--output', out, '--experiment', 'full')
    assert full.returncode == 0, full.stderr[-3000:]
    reference = load_ckpt(out / 'full' / 'last.pth.tar')
    reference_rows = _rows(out / 'full')
    assert [r['epoch'] for r in reference_rows] == ['0', '1', '2']

    for point in ('validate', 'summary', 'torch.save', 'publish'):
        run = out / point.replace('.', '_')
        killed = _driver(point, *RECIPE, '--output', out, '--experiment', run.name)
        assert killed.returncode == -9, (point, killed.returncode, killed.stderr[-2000:])
        _check_files(run)
        epochs_done = [r['epoch'] for r in _rows(run)]
        assert epochs_done == (['0', '1'] if point != 'validate' else ['0']), (point, epochs_done)
        resumed = _driver('none', *RECIPE, '--resume', run / 'last.pth.tar', '--output', out,
                          '--experiment', run.name)
        assert resumed.returncode == 0, (point, resumed.stderr[-3000:])
        _check_files(run)
        assert _rows(run) == reference_rows, point  # every epoch once, the uninterrupted run's numbers
        last = load_ckpt(run / 'last.pth.tar')
        assert last['epoch'] == 2
        for name, tensor in reference['state_dict'].items():
            assert torch.equal(last['state_dict'][name], tensor), (point, name)
        best = load_ckpt(run / 'model_best.pth.tar')
        assert best['metric'] == max(float(r['eval_top1']) for r in reference_rows), point
