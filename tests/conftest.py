import pytest


@pytest.fixture(scope="session")
def smollm2_path():
    from deployments.models import pull

    return pull("smollm2-135m")
