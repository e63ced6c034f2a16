import pytest


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A TFDS folder per test module: the embedded data is built once, by the first run."""
    return str(tmp_path_factory.mktemp("tfds"))
