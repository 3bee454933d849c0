"""Reporting: where rows come from, how they are ranked, and how they are shown.

Sources: `database` (the hourly growth rows and worker rows of a window) and `logs` (uWSGI
memory-report logs: `uwsgi_lines` reads a line and turns its path into a key, `uwsgi_log` is
the per-line loop, `uwsgi_parallel` parses large files in worker processes). `model` holds what
a report is made of; `ranking` orders the rows and recommends a recycling limit; `render`
writes the table, JSON and CSV; `detail` reads and renders one key's allocation sites;
`history`, `pages`, `charts` and `html_report` lay the same figures out over time for the
admin pages and the HTML report. `run` is leakreport's pipeline end to end. docs/design.md
draws it.
"""
