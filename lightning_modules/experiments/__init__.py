"""Experiments over many runs (the compare command): `plan` (which runs, their configs and
hashes), `runner` (run or resume them, in parallel processes if asked), `results` (results.csv),
`summary` (means and intervals), `plots` (figures), `parallel_runs` (worker processes)."""
