"""Model card (the Hub's README.md) for a timm model trained with timm_stim, from a run's args and results.

Training args are split into the recipe and the Stimulative Training options; local paths, secrets and run
bookkeeping never reach the (public) card.
"""
import csv
import math
import re
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import yaml

__all__ = ['create_model_card', 'read_run_metrics', 'split_recipe']

# training args that are local paths, run bookkeeping or secrets: never written into a public model card
_PRIVATE_ARGS = {
    'data', 'data_dir', 'class_map', 'output', 'experiment', 'resume', 'initial_checkpoint', 'pretrained_path',
    'local_rank', 'rank', 'world_size', 'device', 'checkpoint_hist', 'recovery_interval'}
_PRIVATE_ARG_RE = re.compile(r'(^|_)(dir|file|wandb|hub|token|secret|password|api_key|key)(_|$)')
_PATH_VALUE_RE = re.compile(r'^(/|~|\.{1,2}/|[A-Za-z]:\\)|(^|\b)hf_[A-Za-z0-9]{20,}')
_STIM_ARG_RE = re.compile(r'^(stim|st_)')


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


def read_run_metrics(run_dir: Union[str, Path]) -> Dict[str, Any]:
    """Final metrics of a timm output folder: the last row of ``summary.csv`` plus the best eval top-1."""
    summary_file = Path(run_dir) / 'summary.csv'
    if not summary_file.is_file():
        return {}
    with summary_file.open(newline='', encoding='utf-8') as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    metrics = {k: _number(v) for k, v in rows[-1].items() if k}
    top1 = [v for v in (_number(r.get('eval_top1')) for r in rows) if isinstance(v, (int, float))]
    if top1:
        metrics['best_eval_top1'] = max(top1)
    return metrics


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
