"""Everything Lightning: the methods, how a run is assembled, analysis after training, and
multi-run experiments, in rooms by role. The command modules stay at this level:

    python -m lightning_modules.fit       # one run: align, validate, test, export
    python -m lightning_modules.evaluate  # one model on VLGuard-format files (or a suite)
    python -m lightning_modules.compare   # every method over a seed stack, with intervals
    python -m lightning_modules.harvest   # the forget set from the base model's own answers

Rooms, lowest first (each imports only the rooms before it and the lower packages):

    methods/      the LightningModules, one per method, over the pure losses; the registry
    config/       the schema of every config section and command, and YAML composition
    analysis/     after training: generation (predict), knowledge probes, the evaluate logic
    run/          one fit: run directory, resume, checkpoints, loggers, strategies, assembly,
                  tiny-base pre-training, forget-set harvest, export, the training sequence
    experiments/  many fits: compare's plan, results, summary, figures and parallel runs
"""
