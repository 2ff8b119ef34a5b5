from __future__ import annotations

import pytest

from tests.harness import Pki


@pytest.fixture
def pki(tmp_path):
    return Pki(tmp_path)
