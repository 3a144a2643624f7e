"""Bar-to-bar correlation vectors: the 28 numbers the loop detector reads (LOOPS.md section 2).

Each function compares the 8 bars of an 8-bar phrase pairwise and returns the upper triangle
(k=1, row-major) of the 8 x 8 matrix: pairs (0,1), (0,2), ..., (0,7), (1,2), ..., (6,7).

- :func:`c_midi` works on pianoroll phrases (128 steps x 57 columns, 16 steps per bar), and
  :func:`c_midi_packed` on the same phrases bit-packed, as the phrase caches store them
  (:mod:`~datamodules.correlation.midi`).
- :func:`c_wav` works on audio loops, comparing one mel power spectrum per bar
  (:mod:`~datamodules.correlation.wav`).
"""
from datamodules.correlation.bars import N_BARS, N_PAIRS, STEPS_PER_BAR
from datamodules.correlation.midi import c_midi, c_midi_packed
from datamodules.correlation.wav import bar_mel_spectra, bar_segments, c_wav, pearson_upper
