"""Bass+drum pianoroll phrases (LOOPS.md sections 1 and 8) and their bit-packed on-disk cache.

- :mod:`~datamodules.pianoroll.layout`: the grid - 8 bars x 16 sixteenth steps, columns 0-8 drum
  classes, 9-56 bass pitches 24..71.
- :mod:`~datamodules.pianoroll.midi_reader`: ``midi_to_windows`` / ``midi_to_phrases``, one Standard
  MIDI File -> binary phrases (N, 128, 57); ``midi_to_packed_windows``, the same bit-packed.
- :mod:`~datamodules.pianoroll.midi_writer`: ``phrases_to_midi``, phrases -> playable MIDI.
- :mod:`~datamodules.pianoroll.cache`: ``pack_phrases`` / ``unpack_phrases`` (912 bytes a phrase, on any
  device; ``unpack_first_steps`` reads step 0 alone), ``write_phrase_cache`` / ``load_phrase_cache``
  (packed phrases read from disk on demand, ``PackedShards``) / ``load_phrases``.
- :mod:`~datamodules.pianoroll.ingestion`: ``ingest`` (also ``python -m datamodules.pianoroll SRC OUT
  [--workers N]``), a folder of MIDI files -> a resumable cache of shards and a report of skips.
- :mod:`~datamodules.pianoroll.synth`: ``render_phrases``, phrases -> audio with a small numpy synth.
"""
from datamodules.pianoroll.cache import (
    REPORT_NAME,
    PackedShards,
    PhraseCache,
    load_phrase_cache,
    load_phrases,
    pack_phrases,
    unpack_first_steps,
    unpack_phrases,
    write_phrase_cache,
)
from datamodules.pianoroll.ingestion import NO_PHRASES, PARSE_ERROR, ingest, main
from datamodules.pianoroll.layout import (
    BARS_PER_PHRASE,
    BASS_HIGHEST,
    BASS_LOWEST,
    BASS_PLAYBACK_PROGRAM,
    BASS_PROGRAMS,
    DRUM_CHANNEL,
    DRUM_CLASS_NOTES,
    DRUM_PLAYBACK_NOTES,
    MIN_ACTIVE_CELLS,
    N_BASS_PITCHES,
    N_COLUMNS,
    N_DRUM_CLASSES,
    PACKED_BYTES,
    PHRASE_STEPS,
    STEPS_PER_BAR,
    STEPS_PER_BEAT,
)
from datamodules.pianoroll.midi_reader import (
    SkipFile,
    midi_to_packed_windows,
    midi_to_phrases,
    midi_to_windows,
    window_phrases,
)
from datamodules.pianoroll.midi_writer import phrases_to_midi
