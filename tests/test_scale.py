"""Peak memory of loop extraction and evaluation does not grow with the phrase cache (measured in subprocesses)."""
from __future__ import annotations

import pytest

from benchmarks import scale
from benchmarks.scale import (
    evaluation_command, extraction_command, run_measured, small_generators, synthetic_detector, write_synthetic_cache,
)
from datamodules.pianoroll import PACKED_BYTES

SMALL, LARGE = 5_000, 500_000


@pytest.mark.slow
def test_peak_rss_of_extraction_and_evaluation_stays_flat_from_5k_to_500k_phrases(tmp_path):
    """Holding the packed cache would add (LARGE - SMALL) x 912 B = 452 MB; on-demand reading adds metadata only."""
    peaks = {}
    for size in (SMALL, LARGE):
        folder = tmp_path / str(size)
        cache = write_synthetic_cache(folder / "phrases", size, progress=False)
        detector = synthetic_detector(folder / "detector.ckpt", cache, kept_fraction=0.13)
        extraction = run_measured(extraction_command(cache, detector, folder / "loops", folder / "run", 1), folder, 2)
        generator = {"cnn_vae": small_generators(folder)["cnn_vae"]}
        evaluation = run_measured(evaluation_command(
            cache, detector, generator, folder / "evaluation",
            ["n=256", "n_networks=1", "max_samples=256", "batch_size=256", "rejection.generators=[]"],
        ), folder, 2)
        peaks[size] = extraction.largest, evaluation.largest
    bound = 0.2 * (LARGE - SMALL) * PACKED_BYTES
    for stage, small, large in zip(("extraction", "evaluation"), peaks[SMALL], peaks[LARGE]):
        assert large - small < bound, f"{stage}: peak RSS grew by {(large - small) / 2**20:.0f} MiB ({peaks})"


def test_a_missing_workdir_is_made(tmp_path, monkeypatch):
    class Written(Exception):
        pass

    def stop(folder, *args, **kwargs):
        assert folder.parent.parent == tmp_path / "new" / "deeper"
        raise Written

    monkeypatch.setattr(scale, "write_synthetic_cache", stop)
    monkeypatch.setattr("sys.argv", ["scale.py", "--phrases", "10", "--workdir", str(tmp_path / "new" / "deeper")])
    with pytest.raises(Written):
        scale.main()
