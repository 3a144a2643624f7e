"""Built-in demo data, generated deterministically so that every experiment runs without a download.

- :mod:`~datamodules.demo.parts`: ``make_demo`` / ``ensure_demo_data`` / ``ensure_demo_input``, the
  three parts (``midi``, ``loops``, ``multitrack``) built atomically, and the command line
  ``python -m datamodules.demo OUT``.
- :mod:`~datamodules.demo.patterns`: the bass and drum material (grooves, loop patterns, songs).
- :mod:`~datamodules.demo.midi_songs`: MIDI songs with per-window loop labels.
- :mod:`~datamodules.demo.audio_loops`: synthesised audio loops with their metadata.
- :mod:`~datamodules.demo.multitrack`: wet multitrack songs in the MUSDB18-HQ layout, and dry stems.
"""
from datamodules.demo.audio_loops import LOOP_SR, build_loops
from datamodules.demo.midi_songs import build_midi, read_window_labels
from datamodules.demo.parts import ALL_PARTS, ensure_demo_data, ensure_demo_input, make_demo, part_is_complete
