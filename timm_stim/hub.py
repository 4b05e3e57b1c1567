"""Push a plain timm model folder to the Hugging Face Hub, and the ``python -m timm_stim.hub push`` command.

The transfer (repo and branch creation, upload, readable failures with a retry command, tokens never shown) lives
here; building the folder is ``timm_stim.model_folder`` and its model card ``timm_stim.card``.

CLI, to push a training output folder, a checkpoint or an export folder without training::

    python -m timm_stim.hub push output/train/run --hub-repo-id owner/resnet18-st
    python -m timm_stim.hub push run/model_best.pth.tar --model resnet18 --num-classes 10 --hub-repo-id owner/name

A run folder alone is enough: the architecture, classifier size and model kwargs come from its args.yaml.
"""
import argparse
import logging
import os
import re
import shlex
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Union

from huggingface_hub import HfApi, constants as hf_constants, get_token

try:
    from huggingface_hub.errors import HfHubHTTPError
except ImportError:  # older huggingface_hub keep it in utils only
    from huggingface_hub.utils import HfHubHTTPError

from .card import create_model_card, read_run_metrics, split_recipe
from .checkpoint import (
    ModelSource, create_model_from_source, data_config_from_args, is_export_folder, resolve_model_source,
)
from .cli import (OneLineArgumentParser, UsageError, check_cli_args, check_git_revision, input_step,
                  parse_model_kwargs, report_error)
from .model_folder import EXPORT_FILES, check_export_target, export_timm_model

_logger = logging.getLogger(__name__)

__all__ = ['DEFAULT_COMMIT_MESSAGE', 'HubPushError', 'check_can_push', 'check_repo_id', 'main', 'push_folder_to_hub',
           'retry_command']

DEFAULT_COMMIT_MESSAGE = 'Upload timm model trained with Stimulative Training (timm_stim)'
_REPO_PART = r'[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?'
_REPO_ID_RE = re.compile(rf'^{_REPO_PART}/{_REPO_PART}$')


class HubPushError(RuntimeError):
    """A push to the Hub failed; the message is one line naming the problem and the fix."""


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


# ------------------------------------------------------------------------------------------------------------- CLI


def _build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog='python -m timm_stim.hub', description='Export and push timm_stim models to the Hugging Face Hub.')
    sub = parser.add_subparsers(dest='command', required=True)
    push = sub.add_parser(
        'push', help='push a training output folder or checkpoint (exported as a plain timm model), '
                     'or an export folder as is')
    push.add_argument('source', metavar='RUN_DIR_OR_CHECKPOINT',
                      help='training output folder (args.yaml + model_best.pth.tar / last.pth.tar), train checkpoint '
                           '(.pth.tar / .pth / .safetensors), or an export folder (config.json + model.safetensors)')
    push.add_argument('--model', help="timm architecture (default: the run's args.yaml), e.g. resnet18")
    push.add_argument('--num-classes', type=int, default=None,
                      help="classifier size (default: the run's args.yaml, else read off the checkpoint)")
    push.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                      help='extra timm.create_model kwargs, e.g. img_size=64 dynamic_img_size=True')
    push.add_argument('--checkpoint', default='best',
                      help="checkpoint of a training folder: 'best' (model_best.pth.tar), 'last', or a file name")
    push.add_argument('--hub-repo-id', required=True, help='target Hub model repo, owner/name')
    push.add_argument('--hub-private', action='store_true', help='create the repo as private')
    push.add_argument('--hub-revision', default=None, help='branch to push to (created if missing)')
    push.add_argument('--use-ema', action='store_true', help='export the EMA weights of the checkpoint')
    push.add_argument('--output', default=None, help='export folder (default: <checkpoint folder>/hf_export)')
    push.add_argument('--dataset', default=None, help='dataset name for the model card (default: from args.yaml)')
    push.add_argument('--license', default=None, help='license for the model card metadata, e.g. apache-2.0')
    push.add_argument('--commit-message', default=DEFAULT_COMMIT_MESSAGE)
    return parser


def _export_source(args: argparse.Namespace, resolved: ModelSource, output: Path, model=None) -> Path:
    """Export the model (built by `prepare_push`, else here) with its weights and a model card from the run's files."""
    if model is None:
        model, resolved = create_model_from_source(resolved)
    print(f'loaded {resolved.weights} of {resolved.model_name} from {resolved.checkpoint}', file=sys.stderr)
    recipe, stim = split_recipe(resolved.train_args)
    dataset = args.dataset or resolved.train_args.get('dataset') or 'an unspecified dataset'
    card = create_model_card(resolved.model_name, args.hub_repo_id, dataset, recipe, stim,
                             read_run_metrics(resolved.checkpoint.parent), license=args.license)
    return export_timm_model(model, output, resolved.model_name, model_card=card,
                             data_config=data_config_from_args(resolved.train_args) or None)


def prepare_push(args: argparse.Namespace):
    """Every check of the ``push`` command, before any work, file write or progress line: the arguments, the model
    source (a run folder alone is enough), the model built with its weights, the export folder, whether a push can
    work at all. Returns (resolved source or None for an export folder pushed as is, export folder, model or
    None); a bad input raises (UsageError, ValueError, OSError, HubPushError) with nothing printed."""
    check_repo_id(args.hub_repo_id)
    check_cli_args(args)
    if args.hub_revision is not None:
        check_git_revision(args.hub_revision)
    if not str(args.commit_message or '').strip():
        raise UsageError('--commit-message must not be empty (the Hub refuses empty commit messages)')
    source = Path(args.source)
    model_kwargs = parse_model_kwargs(args.model_kwargs)
    resolved = output = model = None
    if not is_export_folder(source):
        resolved = resolve_model_source(source, args.model, args.num_classes, model_kwargs, args.checkpoint,
                                        args.use_ema)
        if resolved.checkpoint is None:
            raise ValueError(f'{source}: pass a training output folder, a checkpoint or an export folder '
                             f'({" + ".join(EXPORT_FILES)})')
        output = Path(args.output) if args.output else resolved.checkpoint.parent / 'hf_export'
        check_export_target(output)
    check_can_push()
    if resolved is not None:  # the model with its weights: another architecture or class count is bad input too
        with input_step(f'cannot build the model of {source}', 'check --model, --num-classes and --model-kwargs'):
            model, resolved = create_model_from_source(resolved)
    return resolved, output, model


def run_push(args: argparse.Namespace, prepared=None) -> str:
    """The ``push`` command: check everything (`prepare_push`), export the checkpoint if needed, push; returns the
    repo URL."""
    resolved, output, model = (tuple(prepared) + (None,))[:3] if prepared else prepare_push(args)
    source = Path(args.source)
    folder = source
    if resolved is None and (args.model or args.num_classes or args.model_kwargs or args.use_ema or args.output):
        print(f'note: {source} is an export folder, pushing it as is (model options ignored)', file=sys.stderr)
    if resolved is not None:
        folder = _export_source(args, resolved, output, model)
        print(f'exported to {folder}', file=sys.stderr)
    return push_folder_to_hub(
        folder, args.hub_repo_id, private=args.hub_private, revision=args.hub_revision,
        commit_message=args.commit_message)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit codes: 0 pushed, 2 bad input or a push that cannot work (nothing written), 1 a failure while working."""
    try:
        args = _build_parser().parse_args(argv)
        prepared = prepare_push(args)
    except (UsageError, HubPushError, ValueError, OSError) as e:
        return report_error(e, 2)
    try:
        url = run_push(args, prepared)
    except (HubPushError, ValueError, OSError, RuntimeError) as e:
        return report_error(e, 1)
    print(url)
    return 0


if __name__ == '__main__':
    sys.exit(main())
