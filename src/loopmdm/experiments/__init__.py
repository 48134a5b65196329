"""Matched-FLOPs experiment suites: which arms (suites.py), running them (runner.py),
evaluating each run (evaluate.py) and the report (report.py). The only room that knows
about several runs at once."""
