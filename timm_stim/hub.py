"""Export Stimulative Training results as plain timm models and push them to the Hugging Face Hub.

An export folder holds ``model.safetensors`` + ``config.json`` in timm's native format (plus a ``README.md`` model
card and any extra files), so ``timm.create_model('hf-hub:owner/name', pretrained=True)`` rebuilds the model
without timm_stim: Stimulative Training changes how a network is trained, not its architecture.

CLI, to push an existing checkpoint (or export folder) without training::

    python -m timm_stim.hub push output/train/run/model_best.pth.tar --model resnet18 --num-classes 10 \\
        --hub-repo-id owner/resnet18-st
"""
import argparse
import ast
import contextlib
import csv
import difflib
import json
import logging
import math
import os
import re
import shlex
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import yaml

import timm
from timm.models import is_model, save_for_hf, split_model_name_tag

from huggingface_hub import HfApi, constants as hf_constants, get_token

try:
    from huggingface_hub.errors import HfHubHTTPError
except ImportError:  # older huggingface_hub keep it in utils only
    from huggingface_hub.utils import HfHubHTTPError

from .cli import one_line, report_error

_logger = logging.getLogger(__name__)

__all__ = [
    'HubPushError', 'export_timm_model', 'create_model_card', 'push_folder_to_hub', 'load_checkpoint_into',
    'is_export_folder', 'check_repo_id', 'retry_command', 'read_run_files', 'split_recipe', 'data_config_from_args',
    'main',
]

WEIGHTS_NAME = 'model.safetensors'
CONFIG_NAME = 'config.json'
CARD_NAME = 'README.md'
EXPORT_FILES = (WEIGHTS_NAME, CONFIG_NAME)
# pretrained_cfg fields describing the architecture's default (e.g. ImageNet) weights, not the exported ones
_SOURCE_WEIGHT_FIELDS = ('tag', 'license', 'description', 'origin_url', 'paper_name', 'paper_ids', 'notes')
DEFAULT_COMMIT_MESSAGE = 'Upload timm model trained with Stimulative Training (timm_stim)'
_REPO_PART = r'[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?'
_REPO_ID_RE = re.compile(rf'^{_REPO_PART}/{_REPO_PART}$')
# training args that are local paths, run bookkeeping or secrets: never written into a public model card
_PRIVATE_ARGS = {
    'data', 'data_dir', 'class_map', 'output', 'experiment', 'resume', 'initial_checkpoint', 'pretrained_path',
    'local_rank', 'rank', 'world_size', 'device', 'checkpoint_hist', 'recovery_interval'}
_PRIVATE_ARG_RE = re.compile(r'(^|_)(dir|file|wandb|hub|token|secret|password|api_key|key)(_|$)')
_PATH_VALUE_RE = re.compile(r'^(/|~|\.{1,2}/|[A-Za-z]:\\)|(^|\b)hf_[A-Za-z0-9]{20,}')
_STIM_ARG_RE = re.compile(r'^(stim|st_)')


class HubPushError(RuntimeError):
    """A push to the Hub failed; the message is one line naming the problem and the fix."""


# ---------------------------------------------------------------------------------------------------------- export


def is_export_folder(path: Union[str, Path]) -> bool:
    """True if ``path`` is a folder with timm's native weights + config (what ``export_timm_model`` writes)."""
    path = Path(path)
    return path.is_dir() and all((path / name).is_file() for name in EXPORT_FILES)


def _check_export_target(output_dir: Path) -> None:
    """Only an empty folder or a previous export may be replaced, never e.g. a training output folder."""
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise FileExistsError(f'export target {output_dir} exists and is not a folder')
    if any(output_dir.iterdir()) and not (output_dir / CONFIG_NAME).is_file():
        raise FileExistsError(
            f'refusing to replace {output_dir}: it is not empty and not a timm export folder; choose another --output')


def _sibling(path: Path, kind: str) -> Path:
    """Unused hidden path next to ``path`` (same filesystem, so renames are atomic)."""
    return path.parent / f'.{path.name}.{kind}-{uuid.uuid4().hex[:8]}'


def _swap_into_place(new_dir: Path, output_dir: Path) -> None:
    """Rename a complete ``new_dir`` to ``output_dir``; an old export is removed only once the new one is there."""
    if not output_dir.exists():
        new_dir.rename(output_dir)
        return
    old_dir = _sibling(output_dir, 'old')
    output_dir.rename(old_dir)
    try:
        new_dir.rename(output_dir)
    except BaseException:
        old_dir.rename(output_dir)
        raise
    shutil.rmtree(old_dir, ignore_errors=True)


def _architecture(model: torch.nn.Module, model_name: str) -> str:
    """Registered timm architecture of ``model``; checks ``model_name`` agrees so the export rebuilds the same net."""
    pretrained_cfg = getattr(model, 'pretrained_cfg', None)
    if not isinstance(pretrained_cfg, dict) or 'architecture' not in pretrained_cfg:
        raise ValueError(
            f'cannot export {type(model).__name__}: a plain timm model (from timm.create_model) is needed, '
            'unwrap any training wrapper first')
    arch = split_model_name_tag(model_name)[0]
    if arch != pretrained_cfg['architecture'] or not is_model(arch):
        raise ValueError(
            f"model_name '{model_name}' does not match the model's timm architecture "
            f"'{pretrained_cfg['architecture']}'")
    return arch


def _drop_source_weight_fields(config_file: Path) -> None:
    """Remove metadata of the architecture's default weights that timm copies into config.json."""
    config = json.loads(config_file.read_text(encoding='utf-8'))
    pretrained_cfg = config.get('pretrained_cfg', {})
    for key in _SOURCE_WEIGHT_FIELDS:
        pretrained_cfg.pop(key, None)
    config_file.write_text(json.dumps(config, indent=2), encoding='utf-8')


def _default_data_config(model: torch.nn.Module) -> Optional[Dict[str, Any]]:
    """Preprocessing size for a model built with an explicit img_size: the size it was (most likely) trained at.

    timm keeps the architecture default (e.g. 224) as the recommended input of flexible models otherwise.
    """
    img_size = getattr(model, '_model_args', {}).get('img_size')
    return {'img_size': img_size} if img_size is not None else None


def export_timm_model(
        model: torch.nn.Module,
        output_dir: Union[str, Path],
        model_name: str,
        model_args: Optional[Dict[str, Any]] = None,
        model_card: Optional[str] = None,
        extra_files: Optional[Sequence[Union[str, Path]]] = None,
        data_config: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write ``model`` as a plain timm model folder: model.safetensors, config.json, README.md, extra files.

    ``model_args`` are extra reconstruction kwargs for ``timm.create_model`` (timm already records the factory kwargs
    such as num_classes, img_size, dynamic_img_size). ``extra_files`` (e.g. plots referenced by the card through a
    relative path) are copied next to the weights. ``data_config`` is the preprocessing used in training
    (input_size / img_size, mean, std, crop_pct, interpolation), recorded so ``resolve_model_data_config`` returns it;
    it defaults to the model's img_size when it was built with one. The folder is built beside ``output_dir`` and
    renamed into place, so a failed export never leaves a half-written folder nor destroys a previous export.
    """
    output_dir = Path(output_dir)
    arch = _architecture(model, model_name)
    # None means 'unset' (as for timm.create_model kwargs), not a value to record and check against the model
    model_args = {k: v for k, v in (model_args or {}).items() if v is not None}
    extra_files = [Path(f) for f in (extra_files or [])]
    for f in extra_files:
        if not f.is_file():
            raise FileNotFoundError(f'extra file {f} does not exist')
        if f.name in (*EXPORT_FILES, CARD_NAME):
            raise ValueError(f'extra file {f} would overwrite the export\'s own {f.name}')
    _check_export_target(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)

    tmp_dir = _sibling(output_dir, 'tmp')
    tmp_dir.mkdir()
    try:
        save_for_hf(
            model,
            str(tmp_dir),
            model_config={'architecture': arch},
            model_args=model_args,
            safe_serialization=True,
            data_config=data_config if data_config is not None else _default_data_config(model),
        )
        _drop_source_weight_fields(tmp_dir / CONFIG_NAME)
        if model_card is not None:
            (tmp_dir / CARD_NAME).write_text(model_card, encoding='utf-8')
        for f in extra_files:
            shutil.copy2(f, tmp_dir / f.name)
        if not is_export_folder(tmp_dir):
            raise RuntimeError(f'export to {tmp_dir} is incomplete')
        _swap_into_place(tmp_dir, output_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    _logger.info(f'Exported {arch} to {output_dir}')
    return output_dir


# ------------------------------------------------------------------------------------------------------ model card


def _cell(value: Any) -> str:
    """Format a value for a Markdown table cell."""
    if isinstance(value, float):
        text = f'{value:.4f}'.rstrip('0').rstrip('.') if math.isfinite(value) else str(value)
    elif isinstance(value, (list, tuple)):
        text = ', '.join(_cell(v) for v in value)
    else:
        text = str(value)
    return text.replace('|', '\\|').replace('\n', ' ')


def _table(rows: Dict[str, Any], header: Tuple[str, str]) -> str:
    lines = [f'| {header[0]} | {header[1]} |', '|---|---|']
    lines += [f'| {_cell(k)} | {_cell(v)} |' for k, v in rows.items()]
    return '\n'.join(lines)


def create_model_card(
        model_name: str,
        repo_id: Optional[str],
        dataset: str,
        recipe: Dict[str, Any],
        stim: Dict[str, Any],
        metrics: Dict[str, Any],
        extra_sections: Optional[Sequence[str]] = None,
        license: Optional[str] = None,
) -> str:
    """Markdown model card (README.md) with Hub YAML metadata for a timm model trained with Stimulative Training.

    ``recipe`` are the training args, ``stim`` the ST options, ``metrics`` the final results; local paths and
    secrets among the args are left out of the (public) card. ``extra_sections`` (Markdown, e.g. a loafing table or
    a plot referenced by relative path) are appended verbatim.
    """
    recipe, stim = _public_args(recipe or {}), _public_args(stim or {})
    meta: Dict[str, Any] = {'library_name': 'timm'}
    if license:
        meta['license'] = license
    plain = not stim or str(stim.get('stim', '')).startswith('none')
    meta['tags'] = ['image-classification', 'timm'] + ([] if plain else ['stimulative-training'])
    meta['pipeline_tag'] = 'image-classification'
    front_matter = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    title = repo_id.split('/')[-1] if repo_id else model_name
    load_name = f'hf-hub:{repo_id}' if repo_id else 'local-dir:/path/to/this/folder'

    method = ('plain supervised training (the Stimulative Training baseline, `--stim none`)' if plain else
              f"Stimulative Training ({stim.get('stim', 'ST')}) using `timm_stim`, a plugin for "
              '[timm](https://github.com/huggingface/pytorch-image-models)')
    sections = [
        f'---\n{front_matter}---',
        f'# Model card for {title}',
        f'A `{model_name}` image classification model trained on {dataset} with {method}.',
    ]
    if not plain:
        sections.append(
            'Stimulative Training targets the "loafing" of residual networks: trained jointly, the shallower '
            'sub-networks a residual network implicitly contains learn less than they could. During training, ST '
            'samples a random sub-network at each step and trains it to match the full network\'s predictions, in '
            'addition to the usual loss on the full network. ST only changes how the weights were trained: this '
            f'repository holds a plain timm `{model_name}`.')
    sections.append('## Model details\n\n' + '\n'.join([
        f'- **Architecture:** `{model_name}` (timm)',
        f'- **Dataset:** {dataset}',
        '- **Training method:** ' + ('plain supervised training' if plain else
                                     'Stimulative Training (NeurIPS 2022, "Stimulative Training of Residual '
                                     'Networks: A Social Psychology Perspective of Loafing"; ST++: arXiv 2305.02507)'),
    ]))
    if recipe:
        sections.append('## Training recipe\n\n' + _table(recipe, ('Argument', 'Value')))
    if stim and not plain:
        sections.append('## Stimulative Training options\n\n' + _table(stim, ('Option', 'Value')))
    if metrics:
        sections.append('## Results\n\n' + _table(metrics, ('Metric', 'Value')))
    sections.append(
        '## How to load\n\n'
        '```python\n'
        'import timm\n'
        'import torch\n\n'
        f"model = timm.create_model('{load_name}', pretrained=True)\n"
        'model = model.eval()\n'
        'data_config = timm.data.resolve_model_data_config(model)\n'
        'transforms = timm.data.create_transform(**data_config, is_training=False)\n'
        'with torch.no_grad():\n'
        '    logits = model(transforms(img).unsqueeze(0))  # img: a PIL image\n'
        '```\n\n'
        '`timm_stim` is **not** needed to load or run this model: `timm` (and `huggingface_hub`) is enough.')
    sections += [s.strip('\n') for s in (extra_sections or [])]
    return '\n\n'.join(sections) + '\n'


# ------------------------------------------------------------------------------------------------------------ push


def _hub_endpoint(api: Optional[HfApi] = None) -> str:
    endpoint = getattr(api, 'endpoint', None) or getattr(hf_constants, 'ENDPOINT', None)
    return (endpoint or 'https://huggingface.co').rstrip('/')


def _offline() -> bool:
    is_offline = getattr(hf_constants, 'is_offline_mode', None)
    return bool(is_offline() if callable(is_offline) else getattr(hf_constants, 'HF_HUB_OFFLINE', False))


def _saved_token() -> Optional[str]:
    """HF_TOKEN or the token saved by ``hf auth login``, as huggingface_hub resolves it."""
    try:
        return get_token()
    except Exception:
        return None


def check_can_push(token: Optional[str] = None) -> None:
    """Fail early, before any export work, when a push cannot succeed: offline mode or no token at all."""
    if _offline():
        raise HubPushError('HF_HUB_OFFLINE is set: unset it (or set HF_HUB_OFFLINE=0) to push to the Hub')
    if not token and not _saved_token():
        raise HubPushError('no Hugging Face token found: set HF_TOKEN to a write token or run `hf auth login`')


def check_repo_id(repo_id: str) -> str:
    """Validate an ``owner/name`` Hub repo id (the owner is required, so nothing lands in an unexpected namespace)."""
    if not isinstance(repo_id, str) or not _REPO_ID_RE.match(repo_id) or '--' in repo_id or '..' in repo_id:
        raise ValueError(
            f"invalid Hub repo id {repo_id!r}: use 'owner/name' (letters, digits, '-', '_', '.'; "
            "no '--' or '..'), e.g. --hub-repo-id my-user/resnet18-st")
    return repo_id


def retry_command(folder: Union[str, Path], repo_id: str, revision: Optional[str] = None, private: bool = False) -> str:
    """Shell command that retries a push of an export folder."""
    cmd = ['python', '-m', 'timm_stim.hub', 'push', str(folder), '--hub-repo-id', repo_id]
    if revision:
        cmd += ['--hub-revision', revision]
    if private:
        cmd.append('--hub-private')
    return ' '.join(shlex.quote(c) for c in cmd)


def _failure_reason(err: BaseException, endpoint: str, repo_id: str) -> str:
    """Short description of why a Hub call failed, with a hint on what to do."""
    response = getattr(err, 'response', None)
    status = getattr(response, 'status_code', None) if isinstance(err, HfHubHTTPError) else None
    if status is not None:
        server_message = getattr(err, 'server_message', None) or ''
        reason = getattr(response, 'reason_phrase', None) or getattr(response, 'reason', None) or ''
        text = f'HTTP {status} {reason}'.strip()
        if server_message:
            text += f' ({server_message.strip()})'
        owner = repo_id.split('/')[0]
        hints = {
            401: 'check your token: set HF_TOKEN or run `hf auth login`',
            403: f'the token has no write access to {owner!r}: use a write token or a namespace you own',
            404: 'repository or revision not found: check --hub-repo-id / --hub-revision and the token',
            409: 'conflict with the current state of the repository: retry',
            412: 'the branch moved during the push: retry',
            429: 'rate limited: wait and retry',
        }
        hint = hints.get(status, 'Hub server error: retry later' if status >= 500 else '')
        return f'{text}; {hint}' if hint else text
    name = type(err).__name__
    message = ' '.join(str(err).split()) or name
    if 'Connect' in name or 'Timeout' in name or isinstance(err, (ConnectionError, TimeoutError)):
        return f'cannot reach {endpoint} ({message}); check the network or HF_ENDPOINT'
    return f'{name}: {message}'


def _scrub(text: str, secrets: Sequence[Optional[str]]) -> str:
    """Remove tokens from a message, should an error ever echo one."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, '***')
    return ' '.join(text.split())


def _library_version() -> str:
    """timm_stim version for the Hub client's user agent."""
    try:
        from importlib.metadata import version
        return version('timm_stim')
    except Exception:
        return str(getattr(sys.modules.get('timm_stim'), '__version__', 'unknown'))


def _known_tokens(token: Optional[str]) -> List[Optional[str]]:
    return [token, os.environ.get('HF_TOKEN'), os.environ.get('HUGGING_FACE_HUB_TOKEN'), _saved_token()]


def push_folder_to_hub(
        folder: Union[str, Path],
        repo_id: str,
        private: bool = False,
        revision: Optional[str] = None,
        token: Optional[str] = None,
        commit_message: str = DEFAULT_COMMIT_MESSAGE,
) -> str:
    """Upload an export folder to a Hub model repo (created if missing, ``revision`` branch too); returns its URL.

    The token comes from ``token``, else HF_TOKEN or the saved login (huggingface_hub resolves it) and is never
    printed. Any failure raises ``HubPushError`` with a one-line message; local files are never modified.
    """
    folder = Path(folder)
    check_repo_id(repo_id)
    if not is_export_folder(folder):
        raise ValueError(f'{folder} is not an export folder (needs {" + ".join(EXPORT_FILES)})')
    retry = retry_command(folder, repo_id, revision=revision, private=private)
    endpoint = _hub_endpoint()
    where = f'{endpoint}/{repo_id}' + (f' (revision {revision})' if revision else '')
    try:
        check_can_push(token)
    except HubPushError as err:
        raise HubPushError(f'push to {where} not attempted: {err}; then retry with `{retry}`') from None

    try:
        api = HfApi(token=token, library_name='timm_stim', library_version=_library_version())
        endpoint = _hub_endpoint(api)
        # private=None keeps the namespace's default visibility for new repos
        repo_url = api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type='model')
        repo_id = getattr(repo_url, 'repo_id', None) or repo_id
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type='model')
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            revision=revision,
            commit_message=commit_message,
            repo_type='model',
        )
    except Exception as err:
        reason = _failure_reason(err, endpoint, repo_id)
        message = f'push to {where} failed: {reason}; local files are intact in {folder}; retry with `{retry}`'
        raise HubPushError(_scrub(message, _known_tokens(token))) from err
    _logger.info(f"Pushed {folder} to {where}: {getattr(commit, 'commit_url', commit)}")
    url = f'{endpoint}/{repo_id}'
    return f'{url}/tree/{revision}' if revision else url


# ------------------------------------------------------------------------------------------------------ checkpoints


def read_checkpoint(path: Union[str, Path]) -> Any:
    """Checkpoint contents, loaded without unpickling arbitrary objects (timm's args Namespace allowed);
    an unreadable file raises ValueError with a one-line reason."""
    path = Path(path)
    if path.suffix == '.safetensors':
        import safetensors.torch
        return safetensors.torch.load_file(str(path), device='cpu')
    # timm's train script stores its argparse.Namespace args in checkpoints, allow it without full unpickling
    safe_globals = getattr(torch.serialization, 'safe_globals', None)
    allow_args = safe_globals([argparse.Namespace]) if safe_globals else contextlib.nullcontext()
    try:
        with allow_args:
            return torch.load(str(path), map_location='cpu', weights_only=True)
    except Exception as e:
        raise ValueError(f'cannot read checkpoint {path}: {one_line(e)[:300]}') from None


def _select_state_dict(checkpoint: Any, use_ema: bool, path: Path) -> Tuple[Dict[str, torch.Tensor], str]:
    """Pick the model weights out of a train checkpoint; returns them and the key they came from ('' if bare)."""
    if not isinstance(checkpoint, dict):
        raise ValueError(f'checkpoint {path} holds a {type(checkpoint).__name__}, expected a dict of weights')
    keys = ('state_dict_ema', 'model_ema') if use_ema else ('state_dict', 'model')
    for key in keys:
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key], key
    if use_ema:
        raise ValueError(f'--use-ema: checkpoint {path} has no EMA weights (state_dict_ema / model_ema)')
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint, ''
    raise ValueError(
        f'checkpoint {path} has no model weights: expected a state dict or a dict with '
        f"'state_dict' / 'model' (found keys: {', '.join(map(str, list(checkpoint)[:8]))})")


def _clean_keys(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """Strip DDP / torch.compile wrapper prefixes from keys."""
    prefixes = ('module.', '_orig_mod.')
    cleaned = {}
    for key, value in state_dict.items():
        while key.startswith(prefixes):
            key = key.split('.', 1)[1]
        cleaned[key] = value
    return cleaned


def load_checkpoint_into(
        model: torch.nn.Module,
        checkpoint_path: Union[str, Path],
        use_ema: bool = False,
) -> str:
    """Load a train checkpoint (or a bare state dict / .safetensors file) into ``model`` with strict key matching.

    Returns the checkpoint key the weights came from ('' for a bare state dict). Raises ``ValueError`` naming the
    missing / unexpected / mis-shaped keys when the checkpoint doesn't fit the model.
    """
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint {path} does not exist')
    state_dict, key = _select_state_dict(read_checkpoint(path), use_ema, path)
    state_dict = _clean_keys(state_dict)

    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mis_shaped = [
        f'{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}' for k, v in expected.items()
        if k in state_dict and isinstance(state_dict[k], torch.Tensor) and state_dict[k].shape != v.shape]
    if missing or unexpected or mis_shaped:
        def _few(items: List[str]) -> str:
            return ', '.join(items[:3]) + (f' (+{len(items) - 3} more)' if len(items) > 3 else '')
        problems = [f'{name}: {_few(items)}' for name, items in (
            ('missing', missing), ('unexpected', unexpected), ('shape mismatch', mis_shaped)) if items]
        raise ValueError(
            f'checkpoint {path} does not match {type(model).__name__}: ' + '; '.join(problems)
            + '; check --model, --num-classes and --model-kwargs match the training run')
    model.load_state_dict(state_dict, strict=True)
    return key


# -------------------------------------------------------------------------------------------------------- run files


def read_run_files(run_dir: Union[str, Path]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Training args (``args.yaml``) and final metrics (last row of ``summary.csv``) of a timm output folder."""
    run_dir = Path(run_dir)
    args: Dict[str, Any] = {}
    args_file = run_dir / 'args.yaml'
    if args_file.is_file():
        loaded = yaml.safe_load(args_file.read_text(encoding='utf-8'))
        args = loaded if isinstance(loaded, dict) else {}
    metrics: Dict[str, Any] = {}
    summary_file = run_dir / 'summary.csv'
    if summary_file.is_file():
        with summary_file.open(newline='', encoding='utf-8') as f:
            rows = list(csv.DictReader(f))
        if rows:
            metrics = {k: _number(v) for k, v in rows[-1].items() if k}
            top1 = [v for v in (_number(r.get('eval_top1')) for r in rows) if isinstance(v, (int, float))]
            if top1:
                metrics['best_eval_top1'] = max(top1)
    return args, metrics


def data_config_from_args(args: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Preprocessing recorded in training args (timm train.py names), for ``export_timm_model(data_config=...)``."""
    keys = ('input_size', 'img_size', 'crop_pct', 'crop_mode', 'mean', 'std', 'interpolation')
    config = {k: args[k] for k in keys if args.get(k) not in (None, '')}
    return config or None


def _number(text: str) -> Any:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return text
    return int(value) if value.is_integer() and '.' not in str(text) else value


def _public_args(args: Dict[str, Any]) -> Dict[str, Any]:
    """Args fit for a public model card: no local paths, secrets, run bookkeeping or unset values."""
    public = {}
    for key, value in args.items():
        key = str(key)
        if value is None or value == '' or key in _PRIVATE_ARGS or _PRIVATE_ARG_RE.search(key):
            continue
        if isinstance(value, str) and _PATH_VALUE_RE.search(value):
            continue  # a local path or something token-like under an unexpected name
        public[key] = value
    return public


def split_recipe(args: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Split training args into (recipe, ST options) for a model card, dropping paths, secrets and unset values."""
    recipe, stim = {}, {}
    for key, value in _public_args(args).items():
        (stim if _STIM_ARG_RE.match(key) else recipe)[key] = value
    return recipe, stim


# ------------------------------------------------------------------------------------------------------------- CLI


def parse_model_kwargs(items: Optional[Sequence[str]]) -> Dict[str, Any]:
    """`--model-kwargs key=value ...` as create_model kwargs (values parsed as Python literals when they are)."""
    kwargs: Dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition('=')
        if not sep or not key.isidentifier():
            raise ValueError(f'--model-kwargs expects key=value pairs, got {item!r}')
        if value.lower() in ('true', 'false'):
            kwargs[key] = value.lower() == 'true'
            continue
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return kwargs


def _find_checkpoint(source: Path) -> Path:
    """A checkpoint file, or the best/last checkpoint of a training output folder."""
    if source.is_file():
        return source
    if source.is_dir():
        for name in ('model_best.pth.tar', 'last.pth.tar', 'checkpoint.pth.tar'):
            if (source / name).is_file():
                return source / name
        raise ValueError(
            f'{source} is neither an export folder ({" + ".join(EXPORT_FILES)}) nor a training output folder '
            '(model_best.pth.tar / last.pth.tar)')
    raise FileNotFoundError(f'{source} does not exist')


def _check_model_name(name: Optional[str]) -> str:
    if not name:
        raise ValueError('--model is required to push a checkpoint (the timm architecture, e.g. resnet18)')
    if not is_model(split_model_name_tag(name)[0]):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ''
        raise ValueError(
            f"unknown timm model '{name}'{hint}; list names with "
            "`python -c \"import timm; print(timm.list_models('*pattern*'))\"`")
    return name


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python -m timm_stim.hub', description='Export and push timm_stim models to the Hugging Face Hub.')
    sub = parser.add_subparsers(dest='command', required=True)
    push = sub.add_parser(
        'push', help='push a checkpoint (exported as a plain timm model) or an export folder to the Hub')
    push.add_argument('source', metavar='CHECKPOINT_OR_DIR',
                      help='train checkpoint (.pth.tar / .pth / .safetensors), training output folder, '
                           'or an export folder (config.json + model.safetensors), pushed as is')
    push.add_argument('--model', help='timm architecture of the checkpoint, e.g. resnet18')
    push.add_argument('--num-classes', type=int, default=None, help='classifier size of the checkpoint')
    push.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                      help='extra timm.create_model kwargs, e.g. img_size=64 dynamic_img_size=True')
    push.add_argument('--hub-repo-id', required=True, help='target Hub model repo, owner/name')
    push.add_argument('--hub-private', action='store_true', help='create the repo as private')
    push.add_argument('--hub-revision', default=None, help='branch to push to (created if missing)')
    push.add_argument('--use-ema', action='store_true', help='export the EMA weights of the checkpoint')
    push.add_argument('--output', default=None, help='export folder (default: <checkpoint folder>/hf_export)')
    push.add_argument('--dataset', default=None, help='dataset name for the model card (default: from args.yaml)')
    push.add_argument('--license', default=None, help='license for the model card metadata, e.g. apache-2.0')
    push.add_argument('--commit-message', default=DEFAULT_COMMIT_MESSAGE)
    return parser


def _export_checkpoint(
        args: argparse.Namespace,
        checkpoint: Path,
        output: Path,
        model_kwargs: Dict[str, Any],
) -> Path:
    """Rebuild the model, load the checkpoint and export it with a model card from the run's files."""
    try:
        model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes, **model_kwargs)
    except TypeError as e:
        raise ValueError(f'cannot create {args.model} with {model_kwargs}: {e}') from None
    key = load_checkpoint_into(model, checkpoint, use_ema=args.use_ema)
    print(f"loaded {key or 'weights'} from {checkpoint}", file=sys.stderr)

    run_args, metrics = read_run_files(checkpoint.parent)
    recipe, stim = split_recipe(run_args)
    dataset = args.dataset or run_args.get('dataset') or 'an unspecified dataset'
    card = create_model_card(
        args.model, args.hub_repo_id, dataset, recipe, stim, metrics, license=args.license)
    model.eval()
    return export_timm_model(model, output, args.model, model_card=card, data_config=data_config_from_args(run_args))


def run_push(args: argparse.Namespace) -> str:
    """The ``push`` command: validate everything, export the checkpoint if needed, push; returns the repo URL."""
    # arguments first, then whether a push can work at all, and only then any (slow) work
    check_repo_id(args.hub_repo_id)
    source = Path(args.source)
    model_kwargs = parse_model_kwargs(args.model_kwargs)
    checkpoint = output = None
    if is_export_folder(source):
        if args.model or args.num_classes or model_kwargs or args.use_ema or args.output:
            print(f'note: {source} is an export folder, pushing it as is (model options ignored)', file=sys.stderr)
    else:
        checkpoint = _find_checkpoint(source)
        _check_model_name(args.model)
        output = Path(args.output) if args.output else checkpoint.parent / 'hf_export'
        _check_export_target(output)
    check_can_push()

    folder = source
    if checkpoint is not None:
        folder = _export_checkpoint(args, checkpoint, output, model_kwargs)
        print(f'exported to {folder}', file=sys.stderr)
    return push_folder_to_hub(
        folder, args.hub_repo_id, private=args.hub_private, revision=args.hub_revision,
        commit_message=args.commit_message)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        url = run_push(args)
    except (HubPushError, ValueError, OSError) as e:
        return report_error(e, 1)
    print(url)
    return 0


if __name__ == '__main__':
    sys.exit(main())
