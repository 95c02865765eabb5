"""The tiny suite's data (configs/evaluate/suite_tiny.yaml), in each release's real layout: a
training file with planted cues (What / Share), a VLGuard-format test file, MM-SafetyBench's questions
without its image archive, FigStep's and SPA-VL's test sets, and lmms-lab parquet releases of the
utility tasks. tests/test_suite.py uses it; run it to time the suite by hand:

    python tests/suite_fixture.py /tmp/suite-data   # prints the evaluate.benchmarks.* overrides
"""

from __future__ import annotations

import sys
from pathlib import Path

from attack_fixture import benchmark_records, training_records, write_json
from benchmark_fixtures import figstep_repo, lmms_lab_releases, mm_safetybench_repo, spa_vl_test

UTILITY = ("textvqa", "scienceqa_img", "pope", "mme")


def suite_data(root: Path) -> dict[str, Path]:
    """evaluate.benchmarks key -> the file or folder written under `root`."""
    releases = lmms_lab_releases(root / "lmms")
    return dict(vlguard_train=write_json(root / "vlguard" / "train.json", training_records()),
                vlguard_test=write_json(root / "vlguard" / "test.json", benchmark_records()),
                mm_safetybench=mm_safetybench_repo(root / "MMSB", images=False),
                figstep=figstep_repo(root / "FigStep"), spa_vl=spa_vl_test(root / "SPA-VL"),
                **{k: releases[k] for k in UTILITY})


if __name__ == "__main__":
    print(" ".join(f"evaluate.benchmarks.{k}={v}" for k, v in suite_data(Path(sys.argv[1])).items()))
