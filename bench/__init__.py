"""The performance benchmark: ``python -m bench`` (or ``make bench``); see docs/performance.md.

``python -m bench --profile --sizes 32 --skip quickfix,celery`` (or ``make profile``) also shows
where the consumer's own process spends its CPU: see bench/profiling.py.
"""
