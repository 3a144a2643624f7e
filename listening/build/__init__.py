"""Building a listening-test kit: the folder a participant opens in a browser.

- :mod:`~listening.build.audio`: loudness matching under a shared peak ceiling, edge fades, FLAC bytes.
- :mod:`~listening.build.kit`: the folder itself (page, test description, audio, manifest).
- :mod:`~listening.build.loop_sources`: where a system's loops come from (phrase cache, ``generate.py``
  output, generator checkpoint).
- :mod:`~listening.build.loops`: the loop test (Likert ratings of rendered loops).
- :mod:`~listening.build.mixing`: the mixing test (multi-stimulus pages per song and attribute).
"""
