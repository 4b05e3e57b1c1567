"""--resume reproduces an uninterrupted run bit for bit on CPU, and refuses bad checkpoints without writing."""
import hashlib
import shutil

import pytest
import torch

from test_train_stim import FAST, load_ckpt, read_summary, run_train, train_stim
from timm_stim.run_state import AtomicCheckpointSaver, CheckpointContents, TrainingDiverged, write_summary_row

# RNG everywhere: ST++ subnets (resnet18: K=1,2,2,1) and sizes, BN, augmentation, shuffling, stochastic depth, EMA.
RECIPE = ['--model', 'resnet18', '--stim', 'st++', '--stim-min-scale', '0.43', '--epochs', '2', '--drop-path', '0.1',
          '--model-ema', '--model-ema-decay', '0.9', *FAST]


def _tensors(obj, prefix=''):
    """Flatten nested dicts/lists of a checkpoint into {path: tensor}."""
    out = {}
    if torch.is_tensor(obj):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_tensors(v, f'{prefix}/{k}'))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_tensors(v, f'{prefix}/{i}'))
    return out


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.slow
def test_resume_is_bit_identical_and_bad_checkpoints_are_refused(tmp_path, capsys):
    out = tmp_path / 'out'
    full = run_train(*RECIPE, '--output', out, '--experiment', 'full')
    assert full.returncode == 0, full.stderr[-3000:]
    first = run_train(*RECIPE, '--stop-epoch', '1', '--output', out, '--experiment', 'split')
    assert first.returncode == 0, first.stderr[-3000:]
    assert load_ckpt(out / 'split' / 'last.pth.tar')['epoch'] == 0
    second = run_train(*RECIPE, '--resume', out / 'split' / 'last.pth.tar', '--output', out, '--experiment', 'split')
    assert second.returncode == 0, second.stderr[-3000:]

    a, b = load_ckpt(out / 'full' / 'last.pth.tar'), load_ckpt(out / 'split' / 'last.pth.tar')
    assert a['epoch'] == b['epoch'] == 1
    for key in ('state_dict', 'state_dict_ema', 'optimizer', 'task_state'):
        ta, tb = _tensors(a[key]), _tensors(b[key])
        assert ta.keys() == tb.keys() and ta, key
        for name in ta:
            assert torch.equal(ta[name], tb[name]), f'{key}{name} differs after resume'
    assert read_summary(out / 'full') == read_summary(out / 'split')  # same losses and accuracies, epoch by epoch

    # A truncated checkpoint: one-line error, exit 2, nothing written anywhere.
    corrupt = tmp_path / 'corrupt.pth.tar'
    data = (out / 'full' / 'last.pth.tar').read_bytes()
    corrupt.write_bytes(data[:len(data) // 2])
    before = _digest(out / 'split')
    cases = [
        (['--resume', str(corrupt), '--experiment', 'split'], 'cannot read checkpoint'),
        (['--resume', str(out / 'split' / 'last.pth.tar'), '--model', 'resnet34', '--experiment', 'split'],
         'does not match --model resnet34'),
        (['--resume', str(out / 'split' / 'last.pth.tar'), '--stim', 'none', '--experiment', 'split'],
         'resume with the same --stim setting'),
        (['--resume', str(corrupt), '--experiment', 'new'], 'cannot read checkpoint'),
    ]
    for argv, message in cases:
        argv = [a for a in RECIPE if a not in ('--stim', 'st++')] + ['--output', str(out)] + argv
        code = train_stim.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith('error: ') and message in err[0], (argv, err)
    assert _digest(out / 'split') == before
    assert not (out / 'new').exists()
    shutil.rmtree(out)


def test_checkpoint_saver_never_leaves_a_broken_last_checkpoint(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saver = AtomicCheckpointSaver(model, optimizer, checkpoint_dir=str(tmp_path),
                                             recovery_dir=str(tmp_path), max_history=2)
    saver.save_checkpoint(0, metric=1.0)
    last, best = (tmp_path / 'last.pth.tar').read_bytes(), (tmp_path / 'model_best.pth.tar').read_bytes()

    def crash_while_writing(obj, path, *args, **kwargs):
        with open(path, 'wb') as f:
            f.write(b'half a checkpoint')
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, 'save', crash_while_writing)
    with pytest.raises(KeyboardInterrupt):
        saver.save_checkpoint(1, metric=2.0)
    assert (tmp_path / 'last.pth.tar').read_bytes() == last
    assert (tmp_path / 'model_best.pth.tar').read_bytes() == best
    monkeypatch.undo()
    saver.save_checkpoint(1, metric=2.0)  # the next save replaces both, atomically
    assert load_ckpt(tmp_path / 'model_best.pth.tar')['epoch'] == 1
    assert not list(tmp_path.glob('*.tmp'))


def _saver(folder, decreasing=False, max_history=2):
    model = torch.nn.Linear(3, 2)
    return AtomicCheckpointSaver(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                            checkpoint_dir=str(folder), recovery_dir=str(folder),
                                            decreasing=decreasing, max_history=max_history), model


def test_crafted_checkpoint_history_cannot_delete_files_or_suppress_model_best(tmp_path, caplog):
    run, outside = tmp_path / 'run', tmp_path / 'victim.txt'
    run.mkdir()
    outside.write_text('keep me')
    (run / 'notes.txt').write_text('keep me too')
    saver, model = _saver(run)
    saver.save_checkpoint(0, metric=50.0)  # a real checkpoint-0 with metric 50
    crafted = {'checkpoint_files': [(str(outside), 99.0), ('../victim.txt', 98.0), ('notes.txt', 97.0),
                                    ('checkpoint-0.pth.tar', 1e30), ('checkpoint-7.pth.tar', 5.0), 'junk'],
               'best_metric': 1e30, 'best_epoch': 0, 'pending': ('../../x', float('nan'))}
    resumed, _ = _saver(run, max_history=1)
    resumed.load_state_dict(crafted)
    assert resumed.checkpoint_files == [] and resumed.best_metric == 50.0 and resumed.best_epoch == 0
    assert len([r for r in caplog.records if 'ignored' in r.getMessage()]) >= 7
    honest, _ = _saver(run, max_history=1)  # the genuine history of that checkpoint is kept
    honest.load_state_dict({'checkpoint_files': [('checkpoint-0.pth.tar', 50.0)], 'best_metric': 50.0,
                            'best_epoch': 0, 'pending': (None, None)})
    assert honest.checkpoint_files == [(str(run / 'checkpoint-0.pth.tar'), 50.0)]
    for epoch, metric in ((1, 60.0), (2, 40.0), (3, 70.0)):  # pruning to max_history=1 deletes only checkpoint-N
        resumed.save_checkpoint(epoch, metric=metric)
    assert outside.read_text() == 'keep me' and (run / 'notes.txt').read_text() == 'keep me too'
    assert load_ckpt(run / 'model_best.pth.tar')['epoch'] == 3  # a crafted best metric suppressed nothing
    assert sorted(p.name for p in run.glob('checkpoint-*')) == ['checkpoint-0.pth.tar', 'checkpoint-3.pth.tar']


def test_non_finite_weights_are_never_saved(tmp_path):
    saver, model = _saver(tmp_path)
    saver.task = CheckpointContents(type('Task', (), dict(
        model=model, has_ema=lambda self: False, get_checkpoint_state=lambda self, ema=False, **kw: (
            {} if ema else {'state_dict': model.state_dict()})))())
    saver.save_checkpoint(0, metric=1.0)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with torch.no_grad():
        model.weight[0, 0] = float('inf')
    with pytest.raises(TrainingDiverged, match=r'non-finite model weights \(weight\) after epoch 1'):
        saver.save_checkpoint(1, metric=2.0)
    with pytest.raises(TrainingDiverged, match='non-finite model weights'):
        saver.save_recovery(1, batch_idx=3)
    with torch.no_grad():
        model.weight[0, 0] = 0.0
    with pytest.raises(TrainingDiverged, match='non-finite checkpoint metric'):
        saver.save_checkpoint(1, metric=float('nan'))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_summary_rows_are_rewritten_not_lost_or_repeated(tmp_path):
    summary = str(tmp_path / 'summary.csv')
    for epoch in range(3):
        write_summary_row(summary, epoch, {'loss': 1.0 + epoch}, {'top1': 10.0 * epoch}, lr=0.1)
    # a crash after epoch 2's row and before its checkpoint: the resumed run writes epoch 2 (and then 1) again
    write_summary_row(summary, 2, {'loss': 7.0}, {'top1': 70.0}, lr=0.1)
    rows = read_summary(tmp_path)
    assert [r['epoch'] for r in rows] == ['0', '1', '2'] and rows[2]['train_loss'] == '7.0'
    write_summary_row(summary, 1, {'loss': 5.0}, {'top1': 50.0}, lr=0.1)
    assert [r['epoch'] for r in read_summary(tmp_path)] == ['0', '1']
    assert not list(tmp_path.glob('*.tmp'))
