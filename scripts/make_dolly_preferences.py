"""Write a pipeline-check preference set from Dolly-15k: chosen = the record's response, rejected = a response from a
record of another category. It exercises DPO end to end; it is not a set of human preferences (docs/dpo.md)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lit_adapter.errors import run_cli  # noqa: E402


def main(out: Path, n: int = 1000, seed: int = 0, dolly_dir: Path = None) -> None:
    """Write ``n`` prompt/chosen/rejected records (JSON lines) to ``out``.

    Args:
        out: The JSON-lines file to write.
        n: How many pairs (records drawn with the seed).
        seed: Seeds the choice of records and of the rejected responses.
        dolly_dir: The folder of Dolly JSON files (default: ../shared/data/dolly beside the checkout).
    """
    from lit_adapter.train.dpo import dolly_preferences
    from lit_adapter.evaluation import DEFAULT_DATA_DIR

    pairs = dolly_preferences(Path(dolly_dir) if dolly_dir else DEFAULT_DATA_DIR / "dolly", n, seed)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("".join(json.dumps(p) + "\n" for p in pairs))
    print(f"wrote {len(pairs)} pairs to {out}")


if __name__ == "__main__":
    from jsonargparse import CLI

    run_cli(CLI, main, as_positional=False)
