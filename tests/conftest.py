import os
from pathlib import Path

import lightning.fabric  # noqa: F401 (see below)
import pytest
import torch

# Lightning's log handler binds sys.stderr when lightning.fabric is first imported. Imported here, before any test
# captures output, it writes to the session's stream; imported inside a capsys test, later tests would log into that
# test's closed capture ("--- Logging error ---").

# Unit tests use tiny models, for which OpenMP threads cost more than they give (and stall badly when the cores are
# shared); one thread also makes the timings of the end-to-end tests steadier.
torch.set_num_threads(int(os.environ.get("LIT_ADAPTER_TEST_THREADS", "1")))

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LIT_ADAPTER_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real public data beside the checkout (../shared/data); see its README."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA}; set LIT_ADAPTER_SHARED_DATA")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def stories260k(tmp_path_factory, shared_data) -> Path:
    """The real pretrained stories260K, converted once per session with its own tok512 vocabulary."""
    from lit_adapter.convert import convert_llama2c_checkpoint

    out = tmp_path_factory.mktemp("stories260K")
    source = shared_data / "checkpoints" / "stories260K"
    convert_llama2c_checkpoint(source / "stories260K.bin", out, tokenizer_path=source / "tok512.bin")
    return out


@pytest.fixture(scope="session")
def stories_checkpoint(stories260k):
    return stories260k


@pytest.fixture(scope="session")
def instruction_data(tmp_path_factory, stories_checkpoint):
    """400 synthetic instruction records prepared for stories260K (40 for validation): the loop tests' data."""
    from lit_adapter.data.instructions import prepare

    out = tmp_path_factory.mktemp("synthetic")
    prepare(out, stories_checkpoint, source="synthetic", max_records=400, val_size=40, seed=3, max_seq_length=160,
            progress=False, log=lambda *_: None)
    return out
