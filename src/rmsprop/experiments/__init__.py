"""`rmsprop compare`: RMSProp's claims put to the test on real training runs.

tasks.py       eight training tasks, each a function of (optimizer factory, seed, quick)
optimizers.py  the optimizers compared, by name, and the one RMSProp the general claims judge
runner.py      the lr search on selection seeds, the report runs on held-out seeds, in workers
measures.py    scores, divergence, spikes, steps to a target, the paired bootstrap
claims.py      the verdict rules: pure functions of the aggregated numbers
report.py      plots, report.md, a self-contained report.html, results.json
"""

# The run times, stated once (the CLI help and the README quote these): the CPU time measured on
# the project's 2-core machine, over its two cores (wall time grows when other work shares them).
QUICK_TIME = "about 80 s on 2 free cores"
FULL_TIME = "about 21 minutes on 2 free cores"
