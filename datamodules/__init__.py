"""Data: one LightningDataModule per data source (the modules here), and the code they stand on.

DataModules and their loaders (this folder's modules):
    ``phrases`` (pianoroll phrases for the VQ-VAE and CNN-VAE), ``phrase_scoring`` (whole phrase caches
    for the loop detector to score), ``audio_loops`` (C_WAV vectors of audio loops), ``codes`` (VQ-VAE
    code indices for the prior), ``multitrack`` (effect-normalised stems and their mixture),
    ``sharding`` (evaluation sharding across ranks), ``splits`` (train/validation splits by song).
Data-side domain code (sub-packages):
    ``pianoroll`` (MIDI <-> phrases, the bit-packed phrase cache, bulk ingest, phrase audio),
    ``correlation`` (C_MIDI and C_WAV), ``fxnorm`` (effect normalisation of stems).
Demo-data synthesis (sub-package):
    ``demo`` (MIDI songs with loop labels, audio loops, wet and dry multitracks).
"""
