"""`rmsprop compare`: RMSProp's claims put to the test on real training runs.

tasks.py     six training tasks, each a function of (optimizer factory, seed, size)
optimizers.py  the optimizers compared, by name
runner.py    the lr sweep over seeds, in worker processes, and the aggregation
claims.py    the verdict rules: pure functions of the aggregated numbers
report.py    plots, report.md and a self-contained report.html
"""
