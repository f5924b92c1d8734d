"""The speed targets of make bench are judged from the measured numbers, with their bounds."""

from __future__ import annotations

import sys

from helpers import REPO

sys.path.insert(0, str(REPO / "scripts"))
import bench  # noqa: E402


def _size(ours, bf16, ref, stream, ref_eval, flop):
    return {"train_ratio": ours / ref, "train_bf16_ratio": bf16 / ref, "reference_train_tokens_per_s": ref,
            "train_flop_per_token": flop, "eval_stream_ratio": stream / ref_eval,
            "reference_eval_fraction_of_fp32_ceiling": ref_eval * flop / 3 / 100e9}


def test_targets_met_and_missed_with_the_ceiling_bounds():
    results = {"small": _size(1100, 2300, 1000, 3100, 1000, 15e6), "medium": _size(900, 1900, 1000, 2000, 1000, 80e6)}
    targets = {t["target"]: t for t in bench.check_targets(results, fp32=100.0, bf16=200.0)}
    assert targets["small: ours fp32 >= 1.0x reference"]["met"]
    assert not targets["medium: ours fp32 >= 1.0x reference"]["met"]
    assert targets["small: ours bf16 >= 2.2x fp32 reference"]["met"]
    medium_bf16 = targets["medium: ours bf16 >= 2.0x fp32 reference"]
    assert not medium_bf16["met"] and "2.50x" in medium_bf16["why"]  # 200 GFLOP/s / (1000 tok/s * 80 MFLOP)
    assert targets["small: paper-protocol evaluation >= 3x reference batched evaluation"]["met"]
    assert "at most 3.75x in fp32" in targets["medium: paper-protocol evaluation >= 3x reference batched evaluation"]["why"]
