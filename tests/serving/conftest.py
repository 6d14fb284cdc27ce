import pytest

from diffusekit.serving.models import load_models


@pytest.fixture(scope="session")
def digits_models():
    """The embedded digits model, loaded once for every in-thread server."""
    return load_models(["digits=diffusekit:digits"], "cpu")
