"""One `fit` run: `training.run` is the sequence (run directory, resume check, assembly, Trainer,
fit, save, test, results, probes, export); each step lives in the module named after it."""
