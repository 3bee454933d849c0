"""The accuracy workload: a Django project whose leaks and non-leaks are known, and its harness.

accuracysite/ is the project (served from this folder, ``manage.py`` beside it); workload.py
draws a run's leak sizes and traffic mix; harness.py serves one run under a real server and
reads back ``leakreport``'s ranking. bench/bench_accuracy.py and tests/test_accuracy.py use it.
"""
