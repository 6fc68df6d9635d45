import os

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
GOLDEN_213 = os.path.join(REPO, "tests", "data", "dcp_213_2ranks")


@pytest.fixture
def golden_213():
    return GOLDEN_213
