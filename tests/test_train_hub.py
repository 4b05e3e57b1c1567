"""train_stim.py --push-to-hub against a local fake Hub (tests/hub_server.py): success and a failing server."""
import json
import os

import pytest
import safetensors.torch
import yaml

from hub_server import FakeHub
from test_train_stim import FAST, load_ckpt, run_env, run_train

TOKEN = 'hf_fake_train_stim_token_0123456789'
REPO_ID = 'test-user/digits-vit-stpp'


@pytest.fixture
def fake_hub():
    with FakeHub() as server:
        yield server


def _hub_env(url, tmp_path):
    env = run_env(HF_ENDPOINT=url, HF_TOKEN=TOKEN, HF_HUB_OFFLINE='0', HF_HOME=str(tmp_path / 'hf_home'),
                  HF_HUB_DISABLE_PROGRESS_BARS='1', HF_HUB_DISABLE_TELEMETRY='1',
                  NO_PROXY='127.0.0.1,localhost', no_proxy='127.0.0.1,localhost')
    for key in ('HUGGING_FACE_HUB_TOKEN', 'HF_HUB_CACHE', 'HF_TOKEN_PATH'):
        env.pop(key, None)
    return env


def _train(tmp_path, url, *extra):
    # test_vit with ST++ smaller inputs: the export must carry dynamic_img_size=True in its model_args.
    return run_train('--model', 'test_vit', '--stim', 'st++', '--epochs', '1', '--output', tmp_path / 'out',
                     '--experiment', 'hub', '--push-to-hub', '--hub-repo-id', REPO_ID, *FAST, *extra,
                     env=_hub_env(url, tmp_path))


@pytest.mark.slow
def test_push_to_hub_exports_a_plain_timm_model(tmp_path, fake_hub):
    res = _train(tmp_path, fake_hub.url, '--loafing-eval', '3')
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert TOKEN not in res.stdout + res.stderr
    run = tmp_path / 'out' / 'hub'
    assert yaml.safe_load((run / 'args.yaml').read_text())['model_kwargs'] == {'dynamic_img_size': True}
    assert load_ckpt(run / 'last.pth.tar')['args'].model_kwargs == {'dynamic_img_size': True}

    files = fake_hub.files(REPO_ID)
    assert {'config.json', 'model.safetensors', 'README.md'} <= set(files)
    config = json.loads(files['config.json'])
    assert config['architecture'] == 'test_vit' and config['num_classes'] == 10
    assert config['model_args']['dynamic_img_size'] is True
    assert config['pretrained_cfg']['input_size'] == [3, 32, 32]
    pushed = safetensors.torch.load(files['model.safetensors'])
    best = load_ckpt(run / 'model_best.pth.tar')['state_dict']  # --hub-weights best (default)
    assert pushed.keys() == best.keys() and all((pushed[k] == best[k]).all() for k in best)
    card = files['README.md'].decode()
    for text in ('test_vit', 'digits', 'stim_subnets', 'final_eval_top1', 'best checkpoint', "hf-hub:" + REPO_ID):
        assert text in card, text
    assert (run / 'hf_export' / 'model.safetensors').is_file()
    # --loafing-eval: results next to the checkpoints, table and plot in the model card
    rows = json.loads((run / 'loafing' / 'loafing.json').read_text())['results']
    assert len(rows) == 3 and sum(r['is_full'] for r in rows) == 1
    assert 'loafing.png' in card and files['loafing.png'][:8] == b'\x89PNG\r\n\x1a\n'
    full = next(r for r in rows if r['is_full'])
    assert f"{full['top1']:.2f}" in card


@pytest.mark.slow
def test_push_without_validation_split_ranks_by_train_loss(tmp_path, fake_hub):
    res = _train(tmp_path, fake_hub.url, '--val-split', '')
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    card = fake_hub.files(REPO_ID)['README.md'].decode()
    assert 'best_train_loss' in card and 'final_eval_' not in card and 'train loss' in card


@pytest.mark.slow
def test_failed_push_exits_nonzero_and_keeps_local_files(tmp_path, fake_hub):
    fake_hub.set_failure('all', status=503)
    res = _train(tmp_path, fake_hub.url, '--hub-weights', 'last')
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    assert TOKEN not in res.stdout + res.stderr
    assert 'Traceback' not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and 'push to' in errors[0] and 'failed' in errors[0] and 'HTTP 503' in errors[0], errors
    run = tmp_path / 'out' / 'hub'
    assert (run / 'hf_export' / 'model.safetensors').is_file() and (run / 'hf_export' / 'README.md').is_file()
    assert (run / 'last.pth.tar').is_file() and (run / 'summary.csv').is_file()
    assert os.path.getsize(run / 'hf_export' / 'model.safetensors') > 0
