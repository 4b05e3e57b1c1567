"""Tests for timm_stim.checkpoint: safe reading with clear errors, and models rebuilt from every source kind.

All files are real: checkpoints written by torch.save, run folders with args.yaml, timm export folders.
"""
import argparse

import pytest
import timm
import torch
import yaml

from timm_stim.checkpoint import (
    clean_state_dict, create_model_from_source, is_export_folder, load_checkpoint_into, read_checkpoint,
    read_training_checkpoint,
)
from timm_stim.model_folder import export_timm_model


class NotWeights:
    """A Python object in a checkpoint: the safe loader must refuse to unpickle it."""


def _resnet18(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model('resnet18', num_classes=10).eval()


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_read_checkpoint_real_files(tmp_path):
    model = _resnet18()
    ckpt = tmp_path / 'last.pth.tar'
    torch.save({'epoch': 3, 'args': argparse.Namespace(model='resnet18'),  # as timm's train script stores them
                'state_dict': {f'module._orig_mod.{k}': v for k, v in model.state_dict().items()}}, ckpt)
    contents = read_training_checkpoint(ckpt)
    assert contents['epoch'] == 3 and contents['args'].model == 'resnet18'
    assert clean_state_dict(contents['state_dict']).keys() == model.state_dict().keys()
    fresh = timm.create_model('resnet18', num_classes=10)
    assert load_checkpoint_into(fresh, ckpt) == 'state_dict' and _same_weights(fresh, model)


@pytest.mark.parametrize('kind, message', [
    ('text', 'not a PyTorch checkpoint'),
    ('directory', 'is a directory'),
    ('pickle', 'which the safe loader (torch.load weights_only=True) refuses'),
    ('truncated', 'truncated or corrupt'),
    ('empty', 'not a PyTorch checkpoint'),
    ('missing', 'does not exist'),
])
def test_unreadable_checkpoints_say_why(tmp_path, kind, message):
    path = tmp_path / 'checkpoint.pth.tar'
    if kind == 'text':
        path = tmp_path / 'notes.txt'
        path.write_text('This is my notes file\n')
    elif kind == 'directory':
        path.mkdir()
    elif kind == 'pickle':
        torch.save({'state_dict': _resnet18().state_dict(), 'extra': NotWeights()}, path)
    elif kind == 'truncated':
        torch.save({'state_dict': _resnet18().state_dict()}, path)
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif kind == 'empty':
        path.write_bytes(b'')
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        read_checkpoint(path)
    text = str(info.value)
    assert message in text and str(path) in text and '\n' not in text, text
    if kind == 'pickle':
        assert 'NotWeights' in text


def test_not_a_training_checkpoint(tmp_path):
    bare = tmp_path / 'bare.pth'
    torch.save(_resnet18().state_dict(), bare)
    with pytest.raises(ValueError, match='not a train_stim / timm training checkpoint'):
        read_training_checkpoint(bare)


def test_run_folder_alone_is_enough(tmp_path):
    """args.yaml gives the architecture, classes and --model-kwargs; the best checkpoint falls back to the last."""
    torch.manual_seed(0)
    model = timm.create_model('test_vit', num_classes=7, img_size=32, dynamic_img_size=True).eval()
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'args.yaml').write_text(yaml.safe_dump({
        'model': 'test_vit', 'num_classes': 7, 'model_kwargs': {'img_size': 32, 'dynamic_img_size': True},
        'input_size': [3, 32, 32], 'mean': [0.5, 0.5, 0.5], 'data_dir': '/elsewhere'}))
    torch.save({'epoch': 0, 'state_dict': model.state_dict()}, run / 'last.pth.tar')
    loaded, source = create_model_from_source(run)
    assert source.kind == 'train_dir' and source.checkpoint == run / 'last.pth.tar'
    assert source.model_name == 'test_vit' and source.num_classes == 7
    assert source.model_kwargs == {'img_size': 32, 'dynamic_img_size': True}
    assert source.data_config == {'input_size': [3, 32, 32], 'mean': [0.5, 0.5, 0.5]}
    assert _same_weights(loaded, model) and not loaded.training
    x = torch.randn(1, 3, 48, 64)  # dynamic_img_size came from args.yaml
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)

    (run / 'args.yaml').write_text('model: [unclosed\n')
    with pytest.raises(ValueError, match='cannot read .*args.yaml'):
        create_model_from_source(run)


def test_export_folder_sources(tmp_path):
    model = _resnet18()
    export = export_timm_model(model, tmp_path / 'run' / 'hf_export', 'resnet18')
    assert is_export_folder(export) and not is_export_folder(tmp_path / 'run')
    for text in (export, f'local-dir:{export}', tmp_path / 'run'):  # a run folder without checkpoints: its export
        loaded, source = create_model_from_source(text)
        assert source.kind == 'local_dir' and source.checkpoint is None and source.num_classes == 10
        assert source.model_name == 'resnet18' and _same_weights(loaded, model)


def test_unknown_architecture(tmp_path):
    ckpt = tmp_path / 'model.pth'
    torch.save(_resnet18().state_dict(), ckpt)
    with pytest.raises(ValueError, match="unknown timm model 'resnet_18'.*did you mean"):
        create_model_from_source(ckpt, model_name='resnet_18')


def test_load_model_sources(tmp_path):
    """Model loading for the CLI goes through timm_stim.checkpoint: every source kind gives the same weights."""
    model = _resnet18()
    bare = tmp_path / 'bare.pth'
    torch.save(model.state_dict(), bare)
    with pytest.raises(ValueError, match='--model'):
        create_model_from_source(bare)
    classname_arch = tmp_path / 'classname.pth.tar'  # timm's CheckpointSaver without args stores 'resnet'
    torch.save({'state_dict': model.state_dict(), 'arch': 'resnet'}, classname_arch)
    with pytest.raises(ValueError, match='--model'):
        create_model_from_source(classname_arch)
    loaded, source = create_model_from_source(bare, model_name='resnet18')  # num_classes read off the head
    assert source.num_classes == 10 and source.kind == 'checkpoint'
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))

    run = tmp_path / 'run'
    run.mkdir()
    (run / 'args.yaml').write_text(yaml.safe_dump({'model': 'resnet18', 'num_classes': 10, 'img_size': 32}))
    torch.save({'state_dict': model.state_dict(), 'epoch': 1}, run / 'model_best.pth.tar')
    loaded, source = create_model_from_source(run)
    assert source.kind == 'train_dir' and source.label == 'run' and source.checkpoint.name == 'model_best.pth.tar'
    assert source.data_config == {'img_size': 32}
    with pytest.raises(FileNotFoundError, match='last.pth.tar'):
        create_model_from_source(run, checkpoint='last')
    with pytest.raises(FileNotFoundError):
        create_model_from_source(tmp_path / 'missing')

    export = tmp_path / 'export'
    timm.models.save_for_hf(model, export, model_args=dict(num_classes=10), safe_serialization=True)
    for text in (export, f'local-dir:{export}'):
        loaded, source = create_model_from_source(text)
        assert source.kind == 'local_dir' and source.num_classes == 10
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_first_non_finite_names_the_tensor():
    from timm_stim.checkpoint import first_non_finite
    model = timm.create_model('resnet10t', num_classes=4)
    state = model.state_dict()
    assert first_non_finite(state) is None
    big = dict(state, **{'fc.weight': state['fc.weight'] * 1e30})  # huge but finite: no overflow in the check
    assert first_non_finite(big) is None
    for bad in (float('nan'), float('inf'), -float('inf')):
        broken = {k: v.clone() for k, v in state.items()}
        broken['layer2.0.bn1.running_var'][3] = bad
        assert first_non_finite(broken) == 'layer2.0.bn1.running_var'
    half = {'w': torch.ones(3, dtype=torch.bfloat16), 'n': torch.tensor([1, 2]),
            'h': torch.tensor([float('nan')]).half()}
    assert first_non_finite(half) == 'h'
