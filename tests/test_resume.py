"""--resume reproduces an uninterrupted run bit for bit on CPU, and refuses bad checkpoints without writing."""
import hashlib
import shutil

import pytest
import torch

from test_train_stim import FAST, load_ckpt, read_summary, run_train, train_stim

# RNG everywhere: ST++ subnets (resnet18: K=1,2,2,1) and sizes, BN, augmentation, shuffling, stochastic depth, EMA.
RECIPE = ['--model', 'resnet18', '--stim', 'st++', '--epochs', '2', '--drop-path', '0.1', '--model-ema',
          '--model-ema-decay', '0.9', *FAST]


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
    saver = train_stim.AtomicCheckpointSaver(model, optimizer, checkpoint_dir=str(tmp_path),
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
