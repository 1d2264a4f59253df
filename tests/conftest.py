import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the course must never need the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def course():
    """The shipped course model and tokenizer, loaded once for the whole test session."""
    import labkit

    return labkit.load_model(device="cpu")


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (provisioned by `make setup`), loaded once for the whole test session."""
    import labkit

    return labkit.load_model("smollm2", device="cpu")
