"""The documents of the expertmesh_mc and expertmesh_qa tasks: jsonl files next to this one, read
with datasets' packaged "json" loader (offline; the path does not depend on the working directory)."""

from pathlib import Path

HERE = Path(__file__).parent


def _load(name: str):
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(HERE / name)})


def mc(**_):
    """40 multiple-choice questions (question, 4 choices, answer index)."""
    return _load("mc.jsonl")


def qa(**_):
    """30 questions with a one-word or one-number answer."""
    return _load("qa.jsonl")
