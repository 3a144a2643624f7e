"""Bass and drum material for the demo data: grooves, bass lines, loop patterns and whole songs.

Everything lives on the phrase grid (16 steps per 4/4 bar, 12 per 3/4 bar). A song picks a style
(drum groove, scale, key, bass rhythm vocabulary) and strings sections together:

- a *loop* section repeats one 1-, 2- or 4-bar bass+drum pattern exactly;
- a *through-composed* section gives every bar its own bass line (a chord progression walked bar by
  bar, rhythms and pitches redrawn, approach notes) and its own drum variation (moved kicks, ghost
  notes, open hats, crashes, tom/snare fills), and no two of its bars are identical.

The demo's MIDI songs and audio loops both come from :func:`loop_pattern`, so the loops the detector
learns from and the looped sections it must recognise belong to one family.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_DRUMS = 9
N_COLUMNS = 57
BASS_PITCH_OFFSET = 15
KICK, SNARE, CLOSED_HAT, LOW_TOM, OPEN_HAT, MID_TOM, CRASH, HIGH_TOM, RIDE = range(N_DRUMS)

# Drum grooves of one 4/4 bar: class -> steps.
GROOVES_4_4 = {
    "rock": {KICK: [0, 8], SNARE: [4, 12], CLOSED_HAT: [0, 2, 4, 6, 8, 10, 12, 14]},
    "rock_push": {KICK: [0, 6, 8], SNARE: [4, 12], CLOSED_HAT: [0, 2, 4, 6, 8, 10, 12, 14]},
    "disco": {KICK: [0, 4, 8, 12], SNARE: [4, 12], CLOSED_HAT: [0, 4, 8, 12], OPEN_HAT: [2, 6, 10, 14]},
    "funk": {KICK: [0, 3, 8, 10], SNARE: [4, 12], CLOSED_HAT: list(range(16))},
    "halftime": {KICK: [0, 3, 10], SNARE: [8], CLOSED_HAT: [0, 2, 4, 6, 8, 10, 12, 14]},
    "hiphop": {KICK: [0, 7, 10], SNARE: [4, 12], CLOSED_HAT: [0, 2, 4, 6, 8, 9, 10, 12, 14]},
    "ride": {KICK: [0, 10], SNARE: [4, 12], RIDE: [0, 4, 6, 8, 12, 14]},
    "shuffle": {KICK: [0, 7, 8], SNARE: [4, 12], CLOSED_HAT: [0, 3, 4, 7, 8, 11, 12, 15]},
}
GROOVE_3_4 = {KICK: [0], SNARE: [4, 8], CLOSED_HAT: [0, 2, 4, 6, 8, 10]}

SCALES = {
    "minor_pentatonic": (0, 3, 5, 7, 10),
    "natural_minor": (0, 2, 3, 5, 7, 8, 10),
    "dorian": (0, 2, 3, 5, 7, 9, 10),
    "major": (0, 2, 4, 5, 7, 9, 11),
    "mixolydian": (0, 2, 4, 5, 7, 9, 10),
}

# Bass rhythms of one 4/4 bar: (start step, length in steps) per note.
BASS_RHYTHMS = (
    ((0, 2), (2, 2), (4, 2), (6, 2), (8, 2), (10, 2), (12, 2), (14, 2)),
    ((0, 1), (2, 1), (4, 1), (6, 1), (8, 1), (10, 1), (12, 1), (14, 1)),
    ((0, 3), (4, 3), (8, 3), (12, 3)),
    ((0, 3), (3, 1), (6, 2), (8, 1), (10, 3), (14, 2)),
    ((0, 6), (6, 2), (8, 6), (14, 2)),
    ((0, 3), (3, 3), (6, 2), (8, 3), (11, 3), (14, 2)),
    ((0, 2), (3, 1), (4, 2), (7, 1), (8, 2), (11, 1), (12, 2), (15, 1)),
    ((0, 4), (6, 2), (8, 2), (10, 4), (14, 1)),
)
BASS_RHYTHMS_3_4 = (((0, 3), (4, 2), (8, 2)), ((0, 2), (2, 2), (4, 2), (6, 2), (8, 2), (10, 2)))
PROGRESSION_DEGREES = (0, 0, 3, 4, 5, 2, 1, 6)  # weighted pool of scale degrees for chord roots


@dataclass(frozen=True)
class Bar:
    """One bar: drum hits (step, class, velocity) and bass notes (start step, length, MIDI pitch, velocity)."""

    steps: int
    drums: tuple[tuple[int, int, int], ...]
    bass: tuple[tuple[int, int, int, int], ...]

    def roll(self) -> np.ndarray:
        """The bar as a phrase-layout pianoroll ``(steps, 57)`` bool (drum onsets, held bass cells)."""
        roll = np.zeros((self.steps, N_COLUMNS), dtype=bool)
        for step, drum_class, _ in self.drums:
            roll[step, drum_class] = True
        for start, length, pitch, _ in self.bass:
            roll[start:start + length, pitch - BASS_PITCH_OFFSET] = True
        return roll


def song_roll(bars: list[Bar]) -> np.ndarray:
    """The bars one after another as a pianoroll ``(total steps, 57)``."""
    return np.concatenate([bar.roll() for bar in bars])


@dataclass(frozen=True)
class Style:
    """What stays fixed through one song or loop."""

    groove: dict
    scale: tuple[int, ...]
    root: int
    rhythms: tuple
    steps: int

    def chord_root(self, degree: int) -> int:
        octave, index = divmod(degree, len(self.scale))
        return self.root + 12 * octave + self.scale[index]


def random_style(rng: np.random.Generator, steps: int = 16) -> Style:
    """A style for a 4/4 (``steps=16``) or 3/4 (``steps=12``) piece."""
    if steps == 12:
        groove, rhythms = GROOVE_3_4, BASS_RHYTHMS_3_4
    else:
        groove = GROOVES_4_4[rng.choice(sorted(GROOVES_4_4))]
        chosen = rng.choice(len(BASS_RHYTHMS), size=4, replace=False)
        rhythms = tuple(BASS_RHYTHMS[i] for i in chosen)
    scale = SCALES[rng.choice(sorted(SCALES))]
    return Style(groove=groove, scale=scale, root=int(rng.integers(28, 41)), rhythms=rhythms, steps=steps)


def _velocity(rng: np.random.Generator, step: int, base: int) -> int:
    accent = 12 if step % 4 == 0 else 0
    return int(np.clip(base + accent + rng.normal(0, 6), 30, 127))


def drum_bar(style: Style, rng: np.random.Generator, variation: float = 0.0, fill: bool = False,
             crash: bool = False) -> tuple[tuple[int, int, int], ...]:
    """The style's groove, with each kind of variation applied with probability ``variation``.

    ``fill`` replaces the last beat or two with a snare/tom run; ``crash`` adds a crash on step 0.
    """
    steps = style.steps
    hits = {(step, drum_class) for drum_class, positions in style.groove.items() for step in positions}
    if rng.random() < variation:  # move or add a kick on an off-beat 16th or 8th
        hits.add((int(rng.choice([2, 3, 6, 7, 11, 14, 15][: steps - 1])) % steps, KICK))
    if rng.random() < variation:  # snare ghost notes
        for step in rng.choice([1, 5, 7, 9, 13, 15], size=int(rng.integers(1, 3)), replace=False):
            hits.add((int(step) % steps, SNARE))
    if rng.random() < variation:  # open the hi-hat on an off-beat
        step = int(rng.choice([2, 6, 10, 14])) % steps
        hits.discard((step, CLOSED_HAT))
        hits.add((step, OPEN_HAT))
    if rng.random() < variation:  # drop a kick other than the downbeat
        kicks = sorted(step for step, drum_class in hits if drum_class == KICK and step > 0)
        if kicks:
            hits.discard((int(rng.choice(kicks)), KICK))
    if fill:
        length = int(rng.choice([4, 8]))
        hits = {(step, drum_class) for step, drum_class in hits if step < steps - length or drum_class == KICK}
        toms = [HIGH_TOM, HIGH_TOM, MID_TOM, MID_TOM, LOW_TOM, LOW_TOM, SNARE, SNARE]
        stride = int(rng.choice([1, 2])) if length == 8 else 1
        for offset, step in enumerate(range(steps - length, steps, stride)):
            hits.add((step, int(rng.choice([SNARE, toms[offset % len(toms)]]))))
    if crash:
        hits.add((0, CRASH))
    return tuple(sorted((step, drum_class, _velocity(rng, step, 85)) for step, drum_class in hits))


def bass_bar(style: Style, rng: np.random.Generator, degree: int, next_degree: int,
             rhythm: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int, int, int], ...]:
    """A bass line for one bar over the chord on scale ``degree``, leading towards ``next_degree``.

    Strong beats favour the chord root, other notes pick chord tones and scale neighbours, and the
    last note sometimes approaches the next chord's root. Pitches stay within MIDI 24..71.
    """
    root = style.chord_root(degree)
    target = style.chord_root(next_degree)
    chord_tones = [root, root + 7, root + 12, root + style.scale[2 % len(style.scale)]]
    scale_tones = [style.chord_root(degree + offset) for offset in (-1, 1, 2)]
    notes = []
    for index, (start, length) in enumerate(rhythm):
        if start == 0 or (start % 8 == 0 and rng.random() < 0.7):
            pitch = root
        elif index == len(rhythm) - 1 and rng.random() < 0.5:
            pitch = target + int(rng.choice([-1, 1, -2, 2]))
        elif rng.random() < 0.6:
            pitch = int(rng.choice(chord_tones))
        else:
            pitch = int(rng.choice(scale_tones))
        while pitch > 60:
            pitch -= 12
        while pitch < 24:
            pitch += 12
        notes.append((start, length, pitch, _velocity(rng, start, 80)))
    return tuple(notes)


def _progression(rng: np.random.Generator, length: int) -> list[int]:
    degrees = [0]
    for _ in range(length - 1):
        degrees.append(int(rng.choice(PROGRESSION_DEGREES)))
    return degrees


def loop_pattern(style: Style, rng: np.random.Generator, n_bars: int) -> list[Bar]:
    """A loop pattern of ``n_bars`` bars: a fixed groove (a turnaround variation in the pattern's
    last bar when it has more than one) under a bass riff over a short progression."""
    degrees = _progression(rng, n_bars)
    rhythm = style.rhythms[int(rng.integers(len(style.rhythms)))]
    bars = []
    for index in range(n_bars):
        if index > 0 and rng.random() < 0.3:
            rhythm = style.rhythms[int(rng.integers(len(style.rhythms)))]
        turnaround = index == n_bars - 1 and n_bars > 1
        drums = drum_bar(style, rng, variation=0.5 if turnaround else 0.0)
        bass = bass_bar(style, rng, degrees[index], degrees[(index + 1) % n_bars], rhythm)
        bars.append(Bar(style.steps, drums, bass))
    return bars


def through_composed(style: Style, rng: np.random.Generator, n_bars: int, first_degree: int = 0) -> list[Bar]:
    """``n_bars`` bars of non-repeating material: every bar gets its own bass line and drum
    variation, fills close each 4-bar group, a crash opens the section; bars are pairwise distinct."""
    degrees = [first_degree] + _progression(rng, n_bars)[1:] + [0]
    bars: list[Bar] = []
    rolls: list[bytes] = []
    for index in range(n_bars):
        for _ in range(20):
            rhythm = style.rhythms[int(rng.integers(len(style.rhythms)))]
            bar = Bar(style.steps,
                      drum_bar(style, rng, variation=0.6, fill=index % 4 == 3, crash=index == 0 or rng.random() < 0.1),
                      bass_bar(style, rng, degrees[index], degrees[index + 1], rhythm))
            key = bar.roll().tobytes()
            if key not in rolls:
                break
        else:
            raise RuntimeError("could not draw a bar distinct from the section's earlier bars")
        bars.append(bar)
        rolls.append(key)
    return bars


@dataclass(frozen=True)
class Section:
    """A run of bars in a song: ``loop_period`` is the pattern length of a loop section, 0 otherwise."""

    start: int
    bars: list[Bar]
    loop_period: int

    @property
    def end(self) -> int:
        return self.start + len(self.bars)


def song_sections(style: Style, rng: np.random.Generator, n_bars: int) -> list[Section]:
    """A song of ``n_bars`` bars as alternating-ish loop and through-composed sections.

    Loop sections last 8-16 bars (a multiple of their 1-, 2- or 4-bar pattern) and through-composed
    ones 4-16 bars; the last section is cut to fit.
    """
    sections: list[Section] = []
    start = 0
    kind_is_loop = bool(rng.random() < 0.5)
    while start < n_bars:
        if kind_is_loop:
            period = int(rng.choice([1, 2, 4], p=[0.3, 0.35, 0.35]))
            length = min(period * int(rng.integers(8 // period, 16 // period + 1)), n_bars - start)
            pattern = loop_pattern(style, rng, period)
            bars = [pattern[index % period] for index in range(length)]
        else:
            period = 0
            length = min(int(rng.choice([4, 8, 12, 16])), n_bars - start)
            bars = through_composed(style, rng, length, first_degree=int(rng.choice(PROGRESSION_DEGREES)))
        sections.append(Section(start, bars, period))
        start += length
        kind_is_loop = not kind_is_loop if rng.random() < 0.8 else kind_is_loop
    return sections
