"""Parts of benchmarks/step_cost.py (the training-step cost benchmark), one job per module.

measure: clocks, memory, dynamo counters, FLOP table; bench: the shared run context (inputs, models, timing);
steps: one training step per config; config_rows: a config's measured row; overhead: the interleaved
plain / none / hand rows and the dispatch cost; script_loop: train_stim.py's epoch loop vs a step loop;
graph_check: dynamo graph counts over sampled steps; report: relative figures and the printed tables.
"""
