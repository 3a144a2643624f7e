"""Effect normalisation (FxNorm) of wet or dry stems: loudness, EQ, DRC, panning, reverb."""
from datamodules.fxnorm.audio import SILENCE_PEAK_DB, as_audio, is_silent, peak_db
from datamodules.fxnorm.drc import (
    CompressorSetting,
    compress,
    exhaustive_compressor_search,
    normalize_drc,
    onset_peak_stats,
    onset_samples,
    search_compressor,
)
from datamodules.fxnorm.eq import mean_spectrum, normalize_eq, smooth_spectrum, zero_phase_fir
from datamodules.fxnorm.loudness import MUSDB18_LOUDNESS, integrated_loudness, normalize_loudness
from datamodules.fxnorm.normalizer import STAGES, FxNormalizer, normalize_folder
from datamodules.fxnorm.panning import mean_similarity, normalize_panning, similarity
from datamodules.fxnorm.reverb import augment_reverb, inference_reverb, room_impulse_response
from datamodules.fxnorm.songs import MIXTURE, STEMS, list_songs, read_song, song_info, write_song

__all__ = [
    "SILENCE_PEAK_DB", "as_audio", "is_silent", "peak_db",
    "CompressorSetting", "compress", "exhaustive_compressor_search", "normalize_drc", "onset_peak_stats",
    "onset_samples", "search_compressor",
    "mean_spectrum", "normalize_eq", "smooth_spectrum", "zero_phase_fir",
    "MUSDB18_LOUDNESS", "integrated_loudness", "normalize_loudness",
    "STAGES", "FxNormalizer", "normalize_folder",
    "mean_similarity", "normalize_panning", "similarity",
    "augment_reverb", "inference_reverb", "room_impulse_response",
    "MIXTURE", "STEMS", "list_songs", "read_song", "song_info", "write_song",
]
