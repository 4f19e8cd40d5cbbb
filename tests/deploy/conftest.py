from __future__ import annotations

import pytest

from tests.deploy.compose import ROOT
from tests.deploy.topology import Image, build_image


@pytest.fixture(scope="session")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    """The image's files (the wheel built from the Docker build context), installed here."""
    return build_image(ROOT, tmp_path_factory.mktemp("image"))
