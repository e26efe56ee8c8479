"""The property and pairwise suites run every state format quantized.

Their moments are small (≤ 48×48) and q8/q4 keep moments below 4096 elements in fp32, as
bitsandbytes does — so without this, every q8/q4 case would test fp32. The test-only knob
is `gradproj.formats.blockwise.MIN_QUANTIZED_NUMEL`, read at every `zeros`/`nbytes` call:
set to 1 here for the whole directory, so every moment of every size is stored as codes +
absmax. The production value (4096) is pinned in tests/kernels/test_qmaps_golden.py.
"""
import pytest

from gradproj.formats import blockwise


@pytest.fixture(scope="module", autouse=True)
def quantize_every_moment():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(blockwise, "MIN_QUANTIZED_NUMEL", 1)
        yield
