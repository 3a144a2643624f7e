"""The phrase grid (LOOPS.md section 1): steps, bars, columns, drum classes and playback notes."""
from __future__ import annotations

STEPS_PER_BEAT = 4
STEPS_PER_BAR = 16
BARS_PER_PHRASE = 8
PHRASE_STEPS = STEPS_PER_BAR * BARS_PER_PHRASE  # 128
BASS_LOWEST, BASS_HIGHEST = 24, 71
N_DRUM_CLASSES = 9
N_BASS_PITCHES = BASS_HIGHEST - BASS_LOWEST + 1  # 48
N_COLUMNS = N_DRUM_CLASSES + N_BASS_PITCHES  # 57
PACKED_BYTES = PHRASE_STEPS * N_COLUMNS // 8  # 912
MIN_ACTIVE_CELLS = 32  # per instrument and window
BASS_PROGRAMS = range(32, 40)
DRUM_CHANNEL = 9

# GM drum notes of each class, in column order; the first-listed playback note represents the class.
DRUM_CLASS_NOTES = (
    (35, 36),  # kick
    (37, 38, 39, 40),  # snare
    (42, 44),  # closed hi-hat
    (41, 43, 45),  # low tom
    (46,),  # open hi-hat
    (47, 48),  # mid tom
    (49, 55, 57),  # crash
    (50,),  # high tom
    (51, 59),  # ride
)
DRUM_PLAYBACK_NOTES = (36, 38, 42, 45, 46, 47, 49, 50, 51)
BASS_PLAYBACK_PROGRAM = 33
