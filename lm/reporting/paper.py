"""The published numbers this project compares with, in one place: Zaremba et al. (2014) Table 1
and the follow-ups that PAPER.md records. Report, configs' comments and tests read them from here."""

from __future__ import annotations

# Zaremba et al. 2014, Table 1 (valid, test), keyed by our experiment names.
PAPER_TABLE_1: dict[str, tuple[str, float, float]] = {
    "zaremba_small": ("non-regularized LSTM (small)", 120.7, 114.5),
    "zaremba_medium": ("medium regularized LSTM", 86.2, 82.7),
    "zaremba_large": ("large regularized LSTM", 82.2, 78.4),
}
# Follow-ups that PAPER.md records (valid, test), for the presets that reproduce them.
FOLLOW_UPS: dict[str, tuple[str, float, float]] = {
    "gal_medium": ("Gal & Ghahramani 2016, variational (medium)", 81.9, 79.7),
    "gal_large": ("Gal & Ghahramani 2016, variational (large)", 77.9, 75.2),
}
REFERENCE_ROWS = {**PAPER_TABLE_1, **FOLLOW_UPS}  # every preset with a published number
# Gal & Ghahramani's test perplexity with Monte Carlo dropout (PAPER.md), per preset.
PAPER_MC_TEST: dict[str, float] = {"gal_medium": 78.6, "gal_large": 73.4}
# Zaremba et al. 2014, section 4.1: the parameters of each size on PTB (10,000 words), per model preset.
PAPER_PARAMETERS: dict[str, int] = {"small": 4_653_200, "medium": 19_780_400, "large": 66_034_000}
# Table 1, model averaging: {experiment: [(number of models, valid, test), ...]}.
PAPER_AVERAGES: dict[str, list[tuple[int, float, float]]] = {
    "zaremba_small": [(2, 100.4, 96.1), (5, 87.9, 84.1), (10, 83.5, 80.0)],
    "zaremba_medium": [(2, 80.6, 77.0), (5, 76.7, 73.3), (10, 75.2, 72.0)],
    "zaremba_large": [(2, 76.9, 73.6), (10, 72.8, 69.5), (38, 71.9, 68.7)],
}
