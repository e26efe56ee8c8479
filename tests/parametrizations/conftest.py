"""Every moment quantized in this directory (q8/q4 keep small moments in fp32 otherwise;
see tests/properties/conftest.py): a suite that claims q8/q4 must engage them."""
import pytest

from gradproj.formats import blockwise


@pytest.fixture(scope="module", autouse=True)
def quantize_every_moment():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(blockwise, "MIN_QUANTIZED_NUMEL", 1)
        yield
