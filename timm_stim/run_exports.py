"""What train_stim.py makes of a finished run: --loafing-eval, --export-subnets and --push-to-hub.

All three start from the same plain timm model (no DDP or compile wrappers) holding the --hub-weights weights,
and write into the run folder: ``loafing/``, ``subnets/`` and ``hf_export/`` (then pushed).
"""
import logging
import os
from collections import OrderedDict

import timm

from .checkpoint import DATA_CONFIG_KEYS, clean_state_dict
from .data import is_digits
from .run_state import read_checkpoint
from .train_args import args_record, build_parser

_logger = logging.getLogger(__name__)

CARD_ARGS = ('model', 'dataset', 'epochs', 'batch_size', 'opt', 'lr', 'sched', 'weight_decay')  # always on the card


def export_run(args, task, output_dir, data_config, device, eval_metrics, best_metric, best_epoch,
               finetune=None) -> None:
    """Rank 0, after the last epoch: the loafing report, the subnet export and the Hub push the flags ask for.

    After --finetune the loafing report measures the same subnets as before the fine-tune (BN re-estimated too)
    and the cards name the parent model, the fine-tune recipe and the before/after table.
    """
    metric_name = f'eval {args.eval_metric}' if eval_metrics else 'train loss'  # no validation split: train loss
    model, source = final_weights(args, task, output_dir, best_metric, best_epoch, metric_name)
    card_sections = []
    if args.loafing_eval and finetune is not None and finetune.before is not None:
        card_sections = [finetune_section(args, model, finetune, output_dir, data_config, device)]
    elif args.loafing_eval:
        card_sections = run_loafing_eval(args, model, source, output_dir, data_config, device)
    if args.export_subnets:
        parent = os.path.basename(output_dir) + (f', an ST fine-tune of {finetune.label}' if finetune else '')
        run_subnet_export(args, model, output_dir, data_config, device, parent)
    if args.push_to_hub:
        push_to_hub(args, task, model, source, output_dir, data_config, eval_metrics, best_metric, card_sections)


def plain_copy(args, state_dict, device):
    """A plain timm model (no DDP / compile wrappers, eval mode) of --model holding `state_dict`."""
    model = timm.create_model(args.model, num_classes=args.num_classes, **args.model_kwargs)
    model.load_state_dict(clean_state_dict(state_dict))
    return model.to(args.device if device is None else device).eval()


def finetune_section(args, model, finetune, output_dir, data_config, device) -> str:
    """--finetune: the same subnets as before the fine-tune, measured again; logged and returned as a card section
    naming the parent, the recipe and the before/after table (<output>/loafing and loafing_before)."""
    from .finetune import measure_subnets, subnet_table
    from .loafing_report import format_summary, loafing_markdown
    after = measure_subnets(model, args, data_config, device, os.path.join(output_dir, 'loafing'),
                            f'{finetune.label} after the fine-tune')
    table = subnet_table(finetune.before, after)
    _logger.info(f'Subnets before and after the fine-tune:\n{format_summary(table)}')
    recipe = ', '.join(f"--{k.replace('_', '-')} {v}" for k, v, _ in finetune.chosen)
    intro = (f'## Fine-tuned from {finetune.label}\n\nParent: `{finetune.source}`. Stimulative Training as a '
             f'fine-tune of {args.epochs} epochs (--stim {args.stim}; settings the fine-tune mode chose: '
             f'{recipe}).\n\n')
    return intro + loafing_markdown(table, 'loafing.png', title='Subnets before and after the fine-tune')


def final_weights(args, task, output_dir, best_metric, best_epoch, metric_name: str = 'eval top1'):
    """A plain timm model (no DDP/compile wrappers) with the --hub-weights weights, and a description of them."""
    if args.hub_weights == 'best':
        state_dict = read_checkpoint(os.path.join(output_dir, 'model_best.pth.tar'))['state_dict']
        source = 'best checkpoint' + (f' (epoch {best_epoch}, {metric_name} {best_metric:.4g})'
                                      if best_metric is not None else '')
    elif args.hub_weights == 'ema':
        state_dict, source = task.get_eval_model(ema=True).module.state_dict(), 'EMA weights after the last epoch'
    else:
        state_dict, source = task.model.state_dict(), 'weights after the last epoch'
    return plain_copy(args, state_dict, None), source


def run_subnet_export(args, model, output_dir, data_config, device, parent: str) -> None:
    """--export-subnets SPEC: the trained model's subnets as smaller plain timm models in <output>/subnets; their
    cards name `parent`."""
    from .export import export_after_training
    rows = export_after_training(model, args.export_subnets, os.path.join(output_dir, 'subnets'),
                                 args_record(args), data_config, device, label=parent)
    for row in rows:
        top1 = row.get('top1')
        _logger.info(f"Subnet {row['name']}: {row['params']} params, top-1 "
                     f"{'-' if top1 is None else f'{top1:.2f}'}, {row['latency_b1_ms']:.2f} ms at batch 1 (CPU)"
                     f" -> {row['folder'] or '(measured only)'}")


def run_loafing_eval(args, model, source, output_dir, data_config, device) -> list:
    """Evaluate the full net and --loafing-eval random subnets of the ST space (the same set for any --stim, so
    runs are comparable); writes <output>/loafing and returns the model-card section (table + plot)."""
    from .data import create_eval_loader
    from .loafing import loafing_eval
    from .loafing_report import format_summary, loafing_markdown
    loader = create_eval_loader(args.dataset, args.data_dir, args.val_split, data_config,
                                batch_size=args.validation_batch_size or args.batch_size, workers=args.workers,
                                device=device)  # not the DistributedSampler's shard: every image
    folder = os.path.join(output_dir, 'loafing')
    _, summary = loafing_eval(model, loader, subnets=f'random:{args.loafing_eval}', space='st', output_dir=folder,
                              label=f'{args.model} --stim {args.stim}', seed=args.seed,
                              input_size=data_config['input_size'], device=device)
    _logger.info(f'Network loafing ({folder}):\n{format_summary(summary)}')
    return [loafing_markdown(summary, 'loafing.png')]


def push_to_hub(args, task, model, source, output_dir, data_config, eval_metrics, best_metric,
                card_sections) -> None:
    """Export `model` as a plain timm model with a model card into <output>/hf_export, then push it."""
    from .card import create_model_card, split_recipe
    from .hub import push_folder_to_hub
    from .model_folder import export_timm_model
    record, defaults = args_record(args), vars(build_parser().parse_args([]))
    recipe, stim = split_recipe({k: v for k, v in record.items()  # the card lists what differs from the defaults
                                 if k in CARD_ARGS or k.startswith('stim') or v != defaults.get(k)})
    if task.stimulator is None:
        stim = {'stim': 'none (plain training, no subnetworks)'}
    else:
        sampler, sizes = task.stimulator.sampler, task.stimulator.subnet_sizes
        stim['stim_rule'] = (f'K={",".join(map(str, sampler.k_list))}' if sampler.k_list else
                             f'bernoulli p={sampler.drop_prob}') + f' over stages {sampler.layout.stage_sizes}'
        stim['stim_input_sizes'] = f'{sizes[0]}..{sizes[-1]} px'
    if is_digits(args.dataset, args.data_dir):
        dataset = ('scikit-learn digits (built into timm_stim: 1438 train / 359 validation images, 8x8 upsampled '
                   'to 32 px)')
    else:
        dataset = args.dataset or 'an image-folder dataset'
    metrics = OrderedDict(exported_weights=source, epochs_trained=args.stop_epoch or args.epochs)
    metrics.update((f'final_eval_{k}', v) for k, v in (eval_metrics or {}).items())
    if best_metric is not None:  # without a validation split the checkpoints are ranked by the training loss
        metrics[f'best_eval_{args.eval_metric}' if eval_metrics else 'best_train_loss'] = best_metric
    plot = os.path.join(output_dir, 'loafing', 'loafing.png')
    folder = export_timm_model(
        model.cpu(), os.path.join(output_dir, 'hf_export'), args.model,
        model_args=dict(args.model_kwargs, num_classes=args.num_classes),
        model_card=create_model_card(args.model, args.hub_repo_id, dataset, recipe, stim, metrics,
                                     extra_sections=card_sections),
        extra_files=[plot] if card_sections and os.path.isfile(plot) else None,
        data_config={k: v for k, v in data_config.items() if k in DATA_CONFIG_KEYS})
    _logger.info(f'Exported the {source} to {folder}; pushing to {args.hub_repo_id}')
    url = push_folder_to_hub(folder, args.hub_repo_id, private=args.hub_private, revision=args.hub_revision)
    _logger.info(f'Pushed to {url}')
