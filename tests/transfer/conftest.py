import pytest

from transfer import BACKENDS


@pytest.fixture(params=sorted(BACKENDS))
def backend(request) -> str:
    return request.param
