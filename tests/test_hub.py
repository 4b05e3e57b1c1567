"""Tests for timm_stim.hub: plain timm exports, model cards, checkpoint loading and Hub pushes.

Pushes talk to a real HTTP server (tests/hub_server.py) through the real huggingface_hub client, in subprocesses
with HF_ENDPOINT pointing at it (huggingface_hub reads it at import). Loading is checked in a fresh subprocess that
only imports timm, as a user of the pushed model would.
"""
import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch
import yaml

import timm
from timm_stim import hub
from timm_stim.card import create_model_card, split_recipe
from timm_stim.checkpoint import is_export_folder, load_checkpoint_into
from timm_stim.model_folder import export_timm_model

try:
    from hub_server import FakeHub
except ImportError:  # tests/ imported as a package
    from .hub_server import FakeHub

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKEN = 'hf_secret_test_token'
VIT_KWARGS = dict(num_classes=10, img_size=64, dynamic_img_size=True)

LOADER = textwrap.dedent('''
    """Load a pushed model the way a user would: plain timm, no timm_stim."""
    import sys
    import timm
    import torch

    args = sys.argv[1:]
    for model_id, io_file in zip(args[::2], args[1::2]):
        model = timm.create_model(model_id, pretrained=True).eval()
        io = torch.load(io_file, weights_only=True)
        with torch.no_grad():
            for x, expected in zip(io['inputs'], io['outputs']):
                torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        print('LOADED', model_id, type(model).__name__, model.num_classes)
    assert 'timm_stim' not in sys.modules, 'loading must not need timm_stim'

''')


# ------------------------------------------------------------------------------------------------------- helpers


@pytest.fixture
def fake_hub():
    with FakeHub() as server:
        yield server


def _env(hub_url: str, tmp_path: Path, with_repo: bool = True, **extra: str) -> Dict[str, str]:
    """Subprocess environment talking to the fake hub, with its own HF cache and a known token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'HUGGING_FACE_', 'TRANSFORMERS_'))}
    pythonpath = [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]
    if with_repo:
        pythonpath.append(str(REPO_ROOT))
    env.update(
        OMP_NUM_THREADS='1',
        PYTHONPATH=os.pathsep.join(pythonpath),
        HF_ENDPOINT=hub_url,
        HF_HUB_OFFLINE='0',
        HF_HOME=str(tmp_path / 'hf_home'),
        HF_TOKEN=TOKEN,
        HF_HUB_DISABLE_PROGRESS_BARS='1',
        HF_HUB_DISABLE_TELEMETRY='1',
        NO_PROXY='127.0.0.1,localhost',
        no_proxy='127.0.0.1,localhost',
    )
    env.update(extra)
    return env


def _run(args: List[str], env: Dict[str, str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], env=env, cwd=str(cwd), capture_output=True, text=True, timeout=timeout)


def _push_cli(source: Path, repo_id: str, env: Dict[str, str], cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    return _run(['-m', 'timm_stim.hub', 'push', str(source), '--hub-repo-id', repo_id, *extra], env, cwd)


def _load_in_fresh_process(models: List[Tuple[str, Path]], hub_url: str, tmp_path: Path) -> str:
    """Load each (model id, io file) with plain timm in a new process and compare its outputs."""
    loader = tmp_path / 'load_model.py'
    loader.write_text(LOADER)
    load_dir = tmp_path / 'loader_cwd'
    load_dir.mkdir(exist_ok=True)
    # no repo on PYTHONPATH and cwd outside the repo: timm_stim can't even be imported by accident
    env = _env(hub_url, tmp_path, with_repo=False, HF_HOME=str(tmp_path / 'hf_home_loader'))
    result = _run([str(loader), *(str(a) for pair in models for a in pair)], env, load_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _save_io(model: torch.nn.Module, io_file: Path, *shapes) -> None:
    """Fixed inputs and the model's outputs for them, for comparison in another process."""
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(*s, generator=gen) for s in shapes]
    model.eval()
    with torch.no_grad():
        outputs = [model(x) for x in inputs]
    torch.save({'inputs': inputs, 'outputs': outputs}, io_file)


def _digest(folder: Path) -> Dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob('*')) if p.is_file()}


def _error_lines(stderr: str) -> List[str]:
    return [line for line in stderr.splitlines() if line.startswith('error:')]


def _vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model('vit_tiny_patch16_224', **VIT_KWARGS).eval()


def _small_resnet(num_classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model('test_resnet', num_classes=num_classes).eval()


# -------------------------------------------------------------------------------------------------------- export


def test_export_is_a_plain_timm_model(tmp_path):
    model = _vit()
    plot = tmp_path / 'loafing.png'
    plot.write_bytes(b'\x89PNG\r\n\x1a\nfake')
    card = create_model_card(
        'vit_tiny_patch16_224', 'owner/vit-st', 'CIFAR-10', {'lr': 1e-3}, {'stim_prob': 0.5}, {'eval_top1': 90.0},
        extra_sections=['## Loafing\n\n![loafing](loafing.png)'])
    out = export_timm_model(
        model, tmp_path / 'export', 'vit_tiny_patch16_224', model_card=card, extra_files=[plot])

    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'loafing.png', 'model.safetensors']
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'vit_tiny_patch16_224'
    assert config['num_classes'] == 10
    assert config['model_args']['dynamic_img_size'] is True
    assert config['model_args']['img_size'] == [64, 64]
    assert config['pretrained_cfg']['input_size'] == [3, 64, 64]  # the size it was built (trained) at
    assert 'tag' not in config['pretrained_cfg']  # metadata of the architecture's ImageNet weights is dropped

    reloaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    with torch.no_grad():
        for x in (torch.randn(2, 3, 64, 64), torch.randn(1, 3, 96, 80)):  # dynamic size survives the export
            torch.testing.assert_close(reloaded(x), model(x), rtol=0, atol=0)


def test_export_is_atomic(tmp_path, monkeypatch):
    out = export_timm_model(_small_resnet(), tmp_path / 'export', 'test_resnet', model_card='# v1\n')
    before = _digest(out)

    broken = _small_resnet()
    monkeypatch.setattr(broken, 'state_dict', lambda *a, **k: (_ for _ in ()).throw(RuntimeError('disk full')))
    with pytest.raises(RuntimeError, match='disk full'):
        export_timm_model(broken, out, 'test_resnet', model_card='# v2\n')
    assert _digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['export']  # no temp / backup folders left behind

    # a successful export replaces the old one completely
    export_timm_model(
        _small_resnet(num_classes=5), out, 'test_resnet', model_args={'num_classes': 5, 'in_chans': None},
        model_card='# v3\n')
    assert (out / 'README.md').read_text() == '# v3\n'
    assert json.loads((out / 'config.json').read_text())['num_classes'] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ['export']


def test_export_refuses_to_replace_other_folders(tmp_path):
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    (run_dir / 'last.pth.tar').write_bytes(b'precious')
    with pytest.raises(FileExistsError, match='not a timm export folder'):
        export_timm_model(_small_resnet(), run_dir, 'test_resnet')
    assert sorted(p.name for p in run_dir.iterdir()) == ['last.pth.tar']
    with pytest.raises(ValueError, match='does not match'):
        export_timm_model(_small_resnet(), tmp_path / 'x', 'resnet18')


# ---------------------------------------------------------------------------------------------------- model card


def test_model_card():
    card = create_model_card(
        'resnet18', 'owner/resnet18-st', 'imagenet-1k',
        recipe={'lr': 0.1, 'epochs': 100, 'aa': 'rand-m9|mstd0.5'},
        stim={'stim_prob': 0.5, 'stim_kd_weight': 1.0},
        metrics={'eval_top1': 71.23456, 'eval_loss': 1.2},
        extra_sections=['## Loafing\n\n| depth | acc |\n|---|---|\n| 1 | 2 |'],
        license='apache-2.0')
    assert card.startswith('---\n')
    meta = yaml.safe_load(card.split('---\n')[1])
    assert meta['library_name'] == 'timm'
    assert meta['license'] == 'apache-2.0'
    assert {'image-classification', 'timm', 'stimulative-training'} <= set(meta['tags'])
    assert "timm.create_model('hf-hub:owner/resnet18-st', pretrained=True)" in card
    assert '`timm_stim` is **not** needed' in card
    assert '| aa | rand-m9\\|mstd0.5 |' in card  # pipes escaped in tables
    assert '| eval_top1 | 71.2346 |' in card
    assert '| stim_prob | 0.5 |' in card
    assert 'imagenet-1k' in card
    assert card.rstrip().endswith('| 1 | 2 |')  # extra sections appended verbatim, last


def test_split_recipe_drops_paths_and_secrets():
    recipe, stim = split_recipe({
        'lr': 0.1, 'drop_path': 0.05, 'data_dir': '/data/imagenet', 'output': './out', 'hub_token': 'x',
        'experiment': 'run1', 'initial_checkpoint': '', 'weird_name': '/home/me/file', 'stim_prob': 0.5,
        'st_mode': 'random', 'opt': None})
    assert recipe == {'lr': 0.1, 'drop_path': 0.05}
    assert stim == {'stim_prob': 0.5, 'st_mode': 'random'}


# ---------------------------------------------------------------------------------------------------- checkpoints


def test_load_checkpoint_into(tmp_path):
    src, ema = _small_resnet(), _small_resnet()
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(1.0)
    ckpt = tmp_path / 'model_best.pth.tar'
    torch.save({
        'epoch': 1,
        'arch': 'test_resnet',
        'state_dict': {f'module.{k}': v for k, v in src.state_dict().items()},  # DDP prefix is stripped
        'state_dict_ema': ema.state_dict(),
        'args': argparse.Namespace(lr=0.1),  # timm's train script stores its args like this
    }, ckpt)

    model = timm.create_model('test_resnet', num_classes=10)
    assert load_checkpoint_into(model, ckpt) == 'state_dict'
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), src.state_dict().values()))
    assert load_checkpoint_into(model, ckpt, use_ema=True) == 'state_dict_ema'
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ema.state_dict().values()))

    bare = tmp_path / 'weights.safetensors'
    import safetensors.torch
    safetensors.torch.save_file(src.state_dict(), str(bare))
    assert load_checkpoint_into(model, bare) == ''

    with pytest.raises(ValueError, match=r'shape mismatch: fc\.weight .*--num-classes'):
        load_checkpoint_into(timm.create_model('test_resnet', num_classes=7), ckpt)
    with pytest.raises(ValueError, match='missing: .*unexpected: '):
        load_checkpoint_into(timm.create_model('test_vit', num_classes=10), ckpt)
    with pytest.raises(ValueError, match='no EMA weights'):
        load_checkpoint_into(model, bare, use_ema=True)
    with pytest.raises(FileNotFoundError):
        load_checkpoint_into(model, tmp_path / 'nope.pth')


# ---------------------------------------------------------------------------------------------- CLI validation


@pytest.mark.parametrize('argv, message', [
    (['push', '{ckpt}', '--model', 'test_resnet', '--hub-repo-id', 'no-owner'], 'invalid Hub repo id'),
    (['push', '{ckpt}', '--model', 'test_resnet', '--hub-repo-id', 'a/b--c'], 'invalid Hub repo id'),
    (['push', '{ckpt}', '--model', 'resnet_nope', '--hub-repo-id', 'a/b'], "unknown timm model 'resnet_nope'"),
    (['push', '{ckpt}', '--hub-repo-id', 'a/b'], '--model is required'),
    (['push', '{missing}', '--model', 'test_resnet', '--hub-repo-id', 'a/b'], 'does not exist'),
    (['push', '{ckpt}', '--model', 'test_resnet', '--model-kwargs', 'oops', '--hub-repo-id', 'a/b'],
     'key=value'),
])
def test_cli_rejects_bad_arguments_before_any_work(tmp_path, capsys, argv, message):
    ckpt = tmp_path / 'last.pth.tar'
    torch.save({'state_dict': _small_resnet().state_dict()}, ckpt)
    argv = [a.format(ckpt=ckpt, missing=tmp_path / 'missing.pth') for a in argv]
    assert hub.main(argv) == 2
    err = capsys.readouterr().err
    assert len(_error_lines(err)) == 1 and message in _error_lines(err)[0], err
    assert 'Traceback' not in err
    assert not (tmp_path / 'hf_export').exists()


def test_push_refuses_offline_mode(tmp_path, monkeypatch):
    out = export_timm_model(_small_resnet(), tmp_path / 'export', 'test_resnet')
    monkeypatch.setattr(hub.hf_constants, 'HF_HUB_OFFLINE', True)
    with pytest.raises(hub.HubPushError, match='not attempted: HF_HUB_OFFLINE is set'):
        hub.push_folder_to_hub(out, 'owner/name')


@pytest.mark.parametrize('offline, token, message', [
    (True, 'hf_x', 'HF_HUB_OFFLINE is set'),
    (False, None, 'no Hugging Face token found'),
])
def test_cli_checks_push_is_possible_before_exporting(tmp_path, capsys, monkeypatch, offline, token, message):
    monkeypatch.setattr(hub.hf_constants, 'HF_HUB_OFFLINE', offline)
    monkeypatch.setattr(hub, 'get_token', lambda: token)
    ckpt = tmp_path / 'last.pth.tar'
    torch.save({'state_dict': _small_resnet().state_dict()}, ckpt)
    assert hub.main(['push', str(ckpt), '--model', 'test_resnet', '--num-classes', '10', '--hub-repo-id', 'a/b']) == 2
    err = capsys.readouterr().err
    assert len(_error_lines(err)) == 1 and message in _error_lines(err)[0], err
    assert not (tmp_path / 'hf_export').exists()


# --------------------------------------------------------------------------------------------- push end to end


def _write_run(run_dir: Path, model: torch.nn.Module) -> Path:
    """A timm-style training output folder: checkpoint, args.yaml, summary.csv."""
    run_dir.mkdir(parents=True)
    ckpt = run_dir / 'model_best.pth.tar'
    torch.save({'epoch': 1, 'state_dict': model.state_dict()}, ckpt)
    (run_dir / 'args.yaml').write_text(yaml.safe_dump({
        'model': 'test_resnet', 'dataset': 'torch/cifar10', 'data_dir': '/secret/datasets', 'lr': 0.05,
        'epochs': 2, 'stim_prob': 0.5}))
    (run_dir / 'summary.csv').write_text(
        'epoch,train_loss,eval_loss,eval_top1,eval_top5\n'
        '0,2.3,2.2,31.5,80.1\n'
        '1,2.0,1.9,42.25,88.0\n')
    return ckpt


@pytest.fixture(scope='module')
def published(tmp_path_factory):
    """Push a ViT export with the API and a resnet checkpoint with the CLI, to one fake hub (shared: subprocesses
    importing torch + timm are the slow part of these tests)."""
    tmp_path = tmp_path_factory.mktemp('published')
    with FakeHub() as server:
        vit = _vit()
        card = create_model_card('vit_tiny_patch16_224', 'owner/vit-st', 'CIFAR-10', {}, {}, {})
        vit_export = export_timm_model(vit, tmp_path / 'export', 'vit_tiny_patch16_224', model_card=card)
        _save_io(vit, tmp_path / 'vit_io.pt', (2, 3, 64, 64), (1, 3, 96, 80))
        script = (
            'import sys; from timm_stim.hub import push_folder_to_hub; '
            'print(push_folder_to_hub(sys.argv[1], "owner/vit-st", commit_message="Add ST ViT"))')
        api_push = _run(['-c', script, str(vit_export)], _env(server.url, tmp_path), tmp_path)

        resnet = _small_resnet()
        ckpt = _write_run(tmp_path / 'run', resnet)
        _save_io(resnet, tmp_path / 'resnet_io.pt', (2, 3, 64, 64))
        # legacy upload path (no Xet pipeline): create_commit + README metadata validation
        env = _env(server.url, tmp_path, HF_HUB_DISABLE_XET='1')
        cli_push = _push_cli(
            ckpt, 'owner/resnet-st', env, tmp_path,
            '--model', 'test_resnet', '--num-classes', '10', '--hub-private', '--hub-revision', 'dev')
        # the README's command: a run folder alone, architecture and classes from its args.yaml / checkpoint
        _write_run(tmp_path / 'run_only', resnet)
        run_push = _push_cli(tmp_path / 'run_only', 'owner/resnet-run', env, tmp_path)
        yield argparse.Namespace(hub=server, tmp_path=tmp_path, vit_export=vit_export, api_push=api_push,
                                 cli_push=cli_push, run_push=run_push, resnet=resnet)


@pytest.mark.slow
def test_push_api(published):
    result, server = published.api_push, published.hub
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f'{server.url}/owner/vit-st'
    assert TOKEN not in result.stdout + result.stderr
    assert f'Bearer {TOKEN}' in server.state.auth_headers  # the token from HF_TOKEN was used, just not shown
    assert any(ua.startswith('timm_stim') for ua in server.state.user_agents)

    remote = server.files('owner/vit-st')
    assert {k: hashlib.sha256(v).hexdigest() for k, v in remote.items() if k != '.gitattributes'} == \
        _digest(published.vit_export)
    assert not server.repo('owner/vit-st').private


@pytest.mark.slow
def test_cli_push_checkpoint(published):
    result, server = published.cli_push, published.hub
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f'{server.url}/owner/resnet-st/tree/dev'
    assert TOKEN not in result.stdout + result.stderr

    export = published.tmp_path / 'run' / 'hf_export'  # default: next to the checkpoint
    assert is_export_folder(export)
    card = (export / 'README.md').read_text()
    assert "hf-hub:owner/resnet-st'" in card and 'torch/cifar10' in card
    assert '| eval_top1 | 42.25 |' in card and '| best_eval_top1 | 42.25 |' in card
    assert '| stim_prob | 0.5 |' in card and '| lr | 0.05 |' in card
    assert '/secret/datasets' not in card

    assert server.repo('owner/resnet-st').private
    assert sorted(server.files('owner/resnet-st', 'main')) == ['.gitattributes']  # pushed to the branch only
    remote = server.files('owner/resnet-st', 'dev')
    assert {k: hashlib.sha256(v).hexdigest() for k, v in remote.items() if k != '.gitattributes'} == _digest(export)


@pytest.mark.slow
def test_cli_push_run_folder_without_model(published):
    """`python -m timm_stim.hub push output/train/<run> --hub-repo-id you/name`: no --model, no --num-classes."""
    result, server = published.run_push, published.hub
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f'{server.url}/owner/resnet-run'
    export = published.tmp_path / 'run_only' / 'hf_export'
    config = json.loads((export / 'config.json').read_text())
    assert config['architecture'] == 'test_resnet' and config['num_classes'] == 10  # classes read off the head
    reloaded = timm.create_model(f'local-dir:{export}', pretrained=True).eval()
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(),
                                                 published.resnet.state_dict().values()))
    remote = server.files('owner/resnet-run')
    assert {k: hashlib.sha256(v).hexdigest() for k, v in remote.items() if k != '.gitattributes'} == _digest(export)


@pytest.mark.slow
def test_pushed_models_load_with_plain_timm(published):
    if published.api_push.returncode or published.cli_push.returncode:
        pytest.skip('push failed, see test_push_api / test_cli_push_checkpoint')
    tmp_path = published.tmp_path
    # the resnet repo is private: the loader needs the token, which _env provides
    out = _load_in_fresh_process([
        ('hf-hub:owner/vit-st', tmp_path / 'vit_io.pt'),
        ('hf-hub:owner/resnet-st@dev', tmp_path / 'resnet_io.pt'),
    ], published.hub.url, tmp_path)
    assert 'LOADED hf-hub:owner/vit-st VisionTransformer 10' in out
    assert 'LOADED hf-hub:owner/resnet-st@dev ResNet 10' in out


@pytest.mark.slow
def test_cli_push_fails_cleanly_then_retry_works(tmp_path, fake_hub):
    model = _small_resnet()
    ckpt = _write_run(tmp_path / 'run', model)
    env = _env(fake_hub.url, tmp_path)
    fake_hub.set_failure('all', 500)

    result = _push_cli(ckpt, 'owner/down', env, tmp_path, '--model', 'test_resnet', '--num-classes', '10')
    assert result.returncode == 1
    assert 'Traceback' not in result.stderr
    assert TOKEN not in result.stdout + result.stderr
    errors = _error_lines(result.stderr)
    assert len(errors) == 1, result.stderr
    export = tmp_path / 'run' / 'hf_export'
    assert f'push to {fake_hub.url}/owner/down failed: HTTP 500' in errors[0]
    assert 'retry later' in errors[0]
    assert f'local files are intact in {export}' in errors[0]
    assert f'retry with `python -m timm_stim.hub push {export} --hub-repo-id owner/down`' in errors[0]

    # the export is complete and right despite the failed push
    before = _digest(export)
    reloaded = timm.create_model(f'local-dir:{export}', pretrained=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), rtol=0, atol=0)

    # the suggested command finishes the job once the hub is back, without touching the local files
    fake_hub.set_failure(None)
    argv = shlex.split(errors[0].split('retry with `')[1].rstrip('`'))
    assert argv[:3] == ['python', '-m', 'timm_stim.hub']
    result = _run(argv[1:], env, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _digest(export) == before
    remote = fake_hub.files('owner/down')
    assert {k: hashlib.sha256(v).hexdigest() for k, v in remote.items() if k != '.gitattributes'} == before


def _http_error(status: int, reason: str, server_message: str = '') -> Exception:
    response = argparse.Namespace(status_code=status, reason_phrase=reason, headers={}, request=None)
    return hub.HfHubHTTPError(f'{status} {reason}', response=response, server_message=server_message)


@pytest.mark.parametrize('status, reason, hint', [
    (401, 'Unauthorized', 'HF_TOKEN'),
    (403, 'Forbidden', "no write access to 'owner'"),
    (404, 'Not Found', '--hub-repo-id'),
    (503, 'Service Unavailable', 'retry later'),
])
def test_failure_reasons_name_the_fix(status, reason, hint):
    text = hub._failure_reason(_http_error(status, reason, 'details'), 'https://hub.example', 'owner/name')
    assert text.startswith(f'HTTP {status} {reason} (details); ') and hint in text
    assert 'cannot reach https://hub.example' in hub._failure_reason(
        ConnectionError('refused'), 'https://hub.example', 'owner/name')
