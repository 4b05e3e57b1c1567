"""Set-up is a transaction: every set-up step that fails is exit 2 with one line and nothing written, weights from
elsewhere go through the safe reader, and a run folder from elsewhere cannot make the run write outside it.

Bad-input cases call `train_stim.main(argv)` in-process (it returns the exit code the script exits with).
"""
import hashlib
import os
import shutil
import sys
from pathlib import Path

import pytest
import timm
import torch

from test_train_stim import FAST, run_train, train_stim

REPO = Path(__file__).resolve().parents[1]
# --stim st: no size probe, so each case reaches its failing step quickly
QUICK = ['--model', 'resnet18', '--stim', 'st', '--epochs', '1', *FAST]


def _run_main(argv, capsys):
    """(exit code, stderr lines) of train_stim.main(argv)."""
    code = train_stim.main([str(a) for a in argv])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, err


def _assert_refused(code, err, out: Path, *words):
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith('error: '), err
    assert 'Traceback' not in err[0]
    for word in words:
        assert word in err[0], err[0]
    assert not out.exists(), f'{out} was created'


# ------------------------------------------------------------------------- every set-up step, made to fail in turn

# (name in train_stim's namespace, words the one-line error must hold)
FACTORIES = [
    ('create_model', 'boom'),
    ('resolve_data_config', 'cannot resolve the data config'),
    ('prepare_model', 'cannot prepare the model'),
    ('create_train_stimulator', 'cannot set up --stim st'),
    ('create_datasets', 'cannot read the data'),
    ('create_loaders', 'cannot build the data loaders'),
    ('check_transforms', 'boom'),
    ('create_criterion', 'cannot build the loss'),
    ('create_task', 'cannot build the loss'),
    ('create_optimizer', 'cannot create --opt sgd'),
    ('compile_and_distribute', 'cannot compile'),
    ('create_lr_scheduler', 'cannot create --sched'),
    ('resume', 'boom'),
]


@pytest.mark.slow
def test_each_setup_step_failing_is_exit_2_and_writes_nothing(tmp_path, capsys, monkeypatch):
    """A failure anywhere in set-up (here: each factory raising in turn) is a usage error before any write."""
    ckpt = tmp_path / 'weights.pth.tar'
    torch.save({'state_dict': timm.create_model('resnet18', num_classes=10).state_dict()}, ckpt)
    for name, words in FACTORIES:
        def fail(*args, **kwargs):
            raise RuntimeError(f'boom in {name}')
        with monkeypatch.context() as patch:
            patch.setattr(train_stim, name, fail)
            out = tmp_path / f'out_{name}'
            extra = ['--resume', ckpt] if name == 'resume' else []
            code, err = _run_main([*QUICK, *extra, '--output', out], capsys)
        # create_model / check_transforms / resume raise their own UsageErrors; a RuntimeError from them is wrapped
        # only where the step is wrapped: either way exit 2, one line, nothing written
        if code != 2:
            pytest.fail(f'{name}: exit {code}, {err}')
        _assert_refused(code, err, out, 'boom')
        assert words in err[0] or words == 'boom', (name, err[0])


# ----------------------------------------------------------------- --initial-checkpoint / --pretrained-path / -c

class Evil:
    """A class the safe loader refuses to unpickle."""


@pytest.fixture(scope='module')
def weight_files(tmp_path_factory):
    root = tmp_path_factory.mktemp('weights')
    good = timm.create_model('resnet18', num_classes=10).state_dict()
    torch.save({'state_dict': timm.create_model('resnet34', num_classes=10).state_dict()}, root / 'other_arch.pth')
    torch.save({'state_dict': timm.create_model('resnet18', num_classes=7).state_dict()}, root / 'other_classes.pth')
    torch.save({'state_dict': good}, root / 'good.pth')
    (root / 'truncated.pth').write_bytes((root / 'good.pth').read_bytes()[:4000])
    torch.save({'state_dict': good, 'extra': Evil()}, root / 'evil.pth')
    nan = {k: v.clone() for k, v in good.items()}
    nan['fc.weight'][0, 0] = float('nan')
    torch.save({'state_dict': nan}, root / 'nan.pth')
    (root / 'notes.txt').write_text('not weights')
    (root / 'binary.yaml').write_bytes(bytes(range(256)) * 4)
    return root


WEIGHT_CASES = [
    ('other_arch.pth', 'does not match'),
    ('other_classes.pth', 'shape mismatch'),
    ('truncated.pth', 'truncated or corrupt'),
    ('evil.pth', 'refuses to unpickle'),
    ('nan.pth', 'NaN or infinite'),
    ('notes.txt', 'not a PyTorch checkpoint'),
]


@pytest.mark.parametrize('flag', ['--initial-checkpoint', '--pretrained-path'])
@pytest.mark.parametrize('name,words', WEIGHT_CASES)
def test_weights_from_elsewhere_use_the_safe_reader(weight_files, tmp_path, capsys, flag, name, words):
    if flag == '--pretrained-path' and name == 'other_classes.pth':
        pytest.skip('--pretrained-path adapts the head to --num-classes, as in timm')
    out = tmp_path / 'out'
    extra = ['--pretrained'] if flag == '--pretrained-path' else []
    code, err = _run_main([*QUICK, flag, weight_files / name, *extra, '--output', out], capsys)
    if flag == '--pretrained-path' and name == 'other_arch.pth':
        words = 'holds another architecture'
    _assert_refused(code, err, out, flag, words)


def test_pretrained_path_loads_matching_weights_with_a_new_head(weight_files, tmp_path):
    """The good file goes through: create_model holds its weights (head re-initialised for 10 classes)."""
    args = train_stim.parse_args([*QUICK, '--pretrained', '--pretrained-path', str(weight_files / 'good.pth'),
                                  '--num-classes', '10'])
    model = train_stim.create_model(args, None)
    saved = torch.load(weight_files / 'good.pth', weights_only=True)['state_dict']
    assert torch.equal(model.state_dict()['layer1.0.conv1.weight'], saved['layer1.0.conv1.weight'])
    assert 'state_dict' not in model.pretrained_cfg


def test_initial_checkpoint_loads_exactly(weight_files):
    args = train_stim.parse_args([*QUICK, '--initial-checkpoint', str(weight_files / 'good.pth'),
                                  '--num-classes', '10'])
    model = train_stim.create_model(args, None)
    saved = torch.load(weight_files / 'good.pth', weights_only=True)['state_dict']
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------------- a run folder from elsewhere

def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
    """A real one-epoch run folder (the thing a user downloads or is handed)."""
    out = tmp_path_factory.mktemp('runs')
    res = run_train(*QUICK, '--output', out, '--experiment', 'run')
    assert res.returncode == 0, res.stderr[-2000:]
    return out / 'run'


def _plant(kind: str, run: Path, outside: Path) -> Path:
    """Turn `run` into a hostile folder: its summary.csv / args.yaml / a subfolder pointing outside it."""
    if kind == 'symlinked files':
        for name in ('summary.csv', 'args.yaml'):
            shutil.copy(run / name, outside / name)
            (run / name).unlink()
            (run / name).symlink_to(outside / name)
        return outside / 'summary.csv'
    if kind == 'hard-linked summary':
        shutil.copy(run / 'summary.csv', outside / 'summary.csv')
        (run / 'summary.csv').unlink()
        os.link(outside / 'summary.csv', run / 'summary.csv')
        return outside / 'summary.csv'
    if kind == 'symlinked temp checkpoint':
        (outside / 'victim.bin').write_bytes(b'precious')
        (run / 'tmp.pth.tar').symlink_to(outside / 'victim.bin')
        return outside / 'victim.bin'
    if kind == 'symlinked export folder':
        (outside / 'subnets').mkdir()
        (outside / 'subnets' / 'keep.txt').write_text('precious')
        (run / 'subnets').symlink_to(outside / 'subnets', target_is_directory=True)
        return outside / 'subnets' / 'keep.txt'
    if kind == 'the folder itself a link':
        real = outside / 'real_run'
        shutil.move(str(run), real)
        run.symlink_to(real, target_is_directory=True)
        return real / 'summary.csv'
    raise ValueError(kind)


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['symlinked files', 'hard-linked summary', 'symlinked temp checkpoint',
                                  'symlinked export folder', 'the folder itself a link'])
def test_resuming_a_hostile_run_folder_in_place_writes_nothing_outside(finished_run, tmp_path, capsys, kind):
    parent, outside = tmp_path / 'parent', tmp_path / 'outside'
    outside.mkdir()
    shutil.copytree(finished_run, parent / 'run')
    run = parent / 'run'
    victim = _plant(kind, run, outside)
    before = {p: _digest(p) for p in outside.rglob('*') if p.is_file()}
    listing = sorted(os.listdir(run))
    code, err = _run_main([*QUICK, '--epochs', '2', '--resume', run / 'last.pth.tar', '--output', parent,
                           '--experiment', 'run'], capsys)
    assert code == 2, err
    assert len(err) == 1 and ('link' in err[0] or 'hard-linked' in err[0]), err
    assert {p: _digest(p) for p in outside.rglob('*') if p.is_file()} == before
    assert victim.exists() and sorted(os.listdir(run)) == listing


def test_check_run_folder_accepts_the_savers_own_hard_links(tmp_path):
    """Checkpoints the saver hard-links to each other (last / model_best / checkpoint-N) are not refused."""
    from timm_stim.run_state import check_run_folder
    (tmp_path / 'last.pth.tar').write_bytes(b'x')
    os.link(tmp_path / 'last.pth.tar', tmp_path / 'model_best.pth.tar')
    (tmp_path / 'loafing').mkdir()
    (tmp_path / 'loafing' / 'loafing.csv').write_text('a,b\n')
    check_run_folder(str(tmp_path))  # no error
    os.mkfifo(tmp_path / 'loafing' / 'summary.csv')
    with pytest.raises(train_stim.UsageError, match='neither a file nor a folder'):
        check_run_folder(str(tmp_path))


def test_summary_rows_replace_a_planted_link_instead_of_writing_through_it(tmp_path):
    """write_summary_row swaps a new file in by name: a link in its place is replaced, its target untouched."""
    from timm_stim.run_state import write_summary_row
    target = tmp_path / 'elsewhere.csv'
    target.write_text('precious\n')
    (tmp_path / 'run').mkdir()
    summary = tmp_path / 'run' / 'summary.csv'
    summary.symlink_to(target)
    write_summary_row(str(summary), 0, {'loss': 1.0}, {'top1': 50.0}, lr=0.1)
    assert target.read_text() == 'precious\n'
    assert not summary.is_symlink() and summary.read_text().splitlines()[-1] == '0,1.0,50.0,0.1'


def test_a_run_folder_name_that_cannot_be_created_leaves_nothing(tmp_path):
    from timm_stim.run_state import make_folders
    root = tmp_path / 'new' / 'output'
    with pytest.raises(OSError):
        make_folders(str(root / ('x' * 10000)))
    assert not (tmp_path / 'new').exists()
