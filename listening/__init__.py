"""Listening tests for both papers: a static web kit built from a run's outputs, and its analysis.

- :mod:`~listening.build`: stimuli from generated loops or from mixes of test songs, loudness
  matched, written with the page into a self-contained folder (``listening_test.py build``).
- :mod:`~listening.web`: the page itself (HTML, CSS, JavaScript), copied into every kit.
- :mod:`~listening.analysis`: the participants' answer files read back, summarised, tested and
  plotted (``listening_test.py analyse``).
"""
