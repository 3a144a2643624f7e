"""What both correlations share: 8 bars compared pairwise, the upper triangle of the 8 x 8 matrix."""
from __future__ import annotations

import numpy as np

N_BARS = 8
STEPS_PER_BAR = 16
N_PAIRS = N_BARS * (N_BARS - 1) // 2
PAIR_ROWS, PAIR_COLS = np.triu_indices(N_BARS, k=1)
