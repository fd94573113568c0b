"""The performance benchmark: ``python -m bench`` (or ``make bench``); see docs/performance.md."""
