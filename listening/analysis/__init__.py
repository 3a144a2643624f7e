"""Analysing a listening test's answers.

- :mod:`~listening.analysis.results`: the page's JSON and CSV answer files read back and checked.
- :mod:`~listening.analysis.statistics`: descriptive figures, Kruskal-Wallis, Friedman with
  Wilcoxon post-hoc tests under Holm's correction, listener post-screening.
- :mod:`~listening.analysis.report`: box plots, CSV tables and the Markdown report.
"""
