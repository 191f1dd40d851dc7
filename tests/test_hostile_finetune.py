"""`monkey finetune` against hostile folders and data: a --out holding the user's own files, tampered
checkpoints, and items made to end the run (a 5,000-character image path, JSON nested past any parser).

The rules: the run folder follows `read --out`'s manifest rule (nothing monkey did not write is replaced or
deleted; such a folder is refused before training, naming the file); --resume checks the checkpoint against
the run before loading any of it; a bad item is skipped with one line naming it.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import require_parity
from PIL import Image
from transformers import TrainerCallback

from monkey_cli.errors import CheckpointError, UsageError
from monkey_cli.finetune.data import load_data
from monkey_cli.finetune.trainer import FinetuneOptions, train
from monkey_cli.model.tokenizer import QWenTokenizer

QA = [("What is the number?", "42"), ("Who signed?", "Alice")]


@pytest.fixture(scope="module")
def tiny() -> Path:
    return require_parity("tiny-monkey")


def _hostile_items(folder: Path) -> list[dict]:
    """Two good items, one whose image path is 5,000 characters long, one nested 100,000 levels deep."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    items = []
    for number, (question, answer) in enumerate(QA):
        pixels = np.random.default_rng(number).integers(0, 256, size=(64, 96, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(folder / "images" / f"p{number}.png")
        turns = [{"from": "user", "value": f"<img>images/p{number}.png</img> {question} Answer: "},
                 {"from": "assistant", "value": answer}]  # fmt: skip
        items.append({"id": f"good-{number}", "conversations": turns})
    long_path = "/".join(["x" * 250] * 20) + ".png"  # 5,019 characters: ENAMETOOLONG
    items.insert(1, {"id": "long", "conversations": [
        {"from": "user", "value": f"<img>{long_path}</img> Q? Answer: "}, {"from": "assistant", "value": "A"}]})
    return items


NESTED = "[" * 100_000 + "]" * 100_000


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A JSON list with the hostile items, the deeply nested one spliced in as raw text."""
    folder = tmp_path_factory.mktemp("data")
    text = json.dumps(_hostile_items(folder))
    path = folder / "train.json"
    path.write_text(text[:-1] + ", " + NESTED + "]", encoding="utf-8")
    return path


def _options(data: Path, out: Path, model: Path, **overrides) -> FinetuneOptions:
    # skip_bad: half of these items are hostile on purpose; the run trains on the others.
    settings = {"device": "cpu", "seed": 0, "max_steps": 3, "save_steps": 1, "batch_size": 1, "learning_rate": 1e-3,
                "lora_r": 4, "lora_alpha": 8, "skip_bad": True, **overrides}  # fmt: skip
    return FinetuneOptions(data=data, out=out, model=str(model), **settings)


def _quiet(message: str) -> None:
    pass


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- bad items ------------------------------------------------------------------------------------------------


def test_a_huge_path_and_deep_nesting_are_items_skipped_by_name(data, tiny) -> None:
    tokenizer = QWenTokenizer.from_dir(tiny)
    loaded = load_data(data, tokenizer, max_length=4096, image_size=(896, 896))
    assert [example.name for example in loaded.examples] == ["train.json: item 1 (id 'good-0')",
                                                             "train.json: item 3 (id 'good-1')"]  # fmt: skip
    assert loaded.total == 4 and len(loaded.skipped) == 2
    long_item, nested = loaded.skipped
    assert long_item.startswith("train.json: item 2 (id 'long'): cannot use the image path ") and len(long_item) < 400
    assert "File name too long" in long_item
    assert nested == "train.json: item 4: JSON nested too deeply to read"
    lines = data.parent / "train.jsonl"  # the same in JSON lines
    items = _hostile_items(data.parent)
    lines.write_text("\n".join([json.dumps(items[0]), NESTED, json.dumps(items[1]), json.dumps(items[2])]) + "\n")
    loaded = load_data(lines, tokenizer, max_length=4096, image_size=(896, 896))
    assert len(loaded.examples) == 2
    assert loaded.skipped[0] == "train.jsonl: line 2: JSON nested too deeply to read"
    assert "cannot use the image path" in loaded.skipped[1]


# --- the run folder's manifest rule ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "planted",
    ["checkpoints/checkpoint-1/notes.txt", "checkpoints/checkpoint-500/optimizer.pt", "loss.jsonl",
     "training_args.json", "adapter_config.json", "checkpoints/my-best/model.bin"],
)  # fmt: skip
def test_a_folder_with_the_users_own_files_where_a_run_writes_is_refused_before_training(
    data, tmp_path, tiny, planted: str
) -> None:
    out = tmp_path / "out"
    (out / planted).parent.mkdir(parents=True)
    (out / planted).write_text("the user's own\n")
    before = _snapshot(out)
    with pytest.raises(UsageError) as caught:
        train(_options(data, out, tiny), log=_quiet)
    message = str(caught.value)
    assert "\n" not in message and "was not written by monkey" in message
    assert str(out / planted.split("/")[0]) in message
    assert _snapshot(out) == before  # nothing written, nothing replaced


class _PlantAt(TrainerCallback):
    """After step 2's save: the user drops a file into checkpoint-1, which the rotation is about to remove."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001 - the Trainer's signature
        if state.global_step == 2:
            (self.out / "checkpoints" / "checkpoint-1" / "mine.txt").write_text("keep me\n")


@pytest.fixture(scope="module")
def run(data, tiny, tmp_path_factory) -> Path:
    """A run in a folder that also holds the user's notes; three steps, a checkpoint each (two kept)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    out.mkdir()
    (out / "notes.txt").write_text("the user's notes\n")
    lines: list[str] = []
    train(_options(data, out, tiny), callbacks=[_PlantAt(out)], log=lines.append)
    assert sum(line.startswith("skipped train.json: item") for line in lines) == 2
    return out


def test_the_run_keeps_the_users_files_and_rotates_only_its_own(run) -> None:
    assert (run / "notes.txt").read_text() == "the user's notes\n"
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    # checkpoint-1 was rotated out: the Trainer's files are gone, the user's file (and so its folder) stays.
    assert [p.name for p in (run / "checkpoints" / "checkpoint-1").iterdir()] == ["mine.txt"]
    manifest = json.loads((run / ".monkey-manifest.json").read_text())["entries"]
    assert {"adapter_config.json", "adapter_model.safetensors", "training_args.json", "loss.jsonl",
            "checkpoints/checkpoint-2", "checkpoints/checkpoint-3"} <= set(manifest)  # fmt: skip
    assert "notes.txt" not in manifest and "checkpoints/mine.txt" not in manifest


def _tamper_state(out: Path, **changes) -> None:
    path = out / "checkpoints" / "checkpoint-3" / "trainer_state.json"
    state = json.loads(path.read_text())
    state.update(changes)
    path.write_text(json.dumps(state))


class _Marker:
    """Unpickling it runs code: it would write a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.write_text, (self.marker, "code ran"))


def _plant_pickle(out: Path) -> None:
    """torch.save's own format (a zip holding a pickle), as the optimizer's state is saved."""
    import torch

    torch.save({"state": _Marker(out.parent / "pwned")}, out / "checkpoints" / "checkpoint-3" / "optimizer.pt")


def _plant_plain_pickle(out: Path) -> None:
    with open(out / "checkpoints" / "checkpoint-3" / "rng_state.pth", "wb") as stream:
        pickle.dump(_Marker(out.parent / "pwned"), stream)


def _plant_unrelated_tensor(out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"base_model.model.something.else": torch.zeros(3)},
              str(out / "checkpoints" / "checkpoint-3" / "adapter_model.safetensors"))  # fmt: skip


TAMPERED = {
    "an unrelated adapter tensor": (_plant_unrelated_tensor, "adapter_model.safetensors"),
    "an absurd global_step": (lambda out: _tamper_state(out, global_step=10**9), "trainer_state.json"),
    "steps beyond the run": (lambda out: _tamper_state(out, max_steps=10**9), "trainer_state.json"),
    "a non-JSON trainer state": (
        lambda out: (out / "checkpoints" / "checkpoint-3" / "trainer_state.json").write_text("{not json"),
        "trainer_state.json",
    ),
    "a pickle that runs code": (_plant_pickle, "optimizer.pt"),
    "a plain pickle": (_plant_plain_pickle, "rng_state.pth"),
    "a stray file": (lambda out: (out / "checkpoints" / "checkpoint-3" / "x.pkl").write_bytes(b"\x80\x04N."), "x.pkl"),
}


@pytest.mark.parametrize("case", TAMPERED, ids=list(TAMPERED))
def test_a_tampered_checkpoint_is_refused_naming_the_file(run, data, tiny, case: str) -> None:
    """Tampered in place (the resume fingerprint holds --out) and put back afterwards: a refused resume
    writes nothing, so the run stays as it was for the next case."""
    tamper, name = TAMPERED[case]
    checkpoint = run / "checkpoints" / "checkpoint-3"
    kept = run.parent / "kept"
    shutil.copytree(checkpoint, kept)
    before = _snapshot(run)
    try:
        tamper(run)
        tampered = _snapshot(run)
        with pytest.raises(CheckpointError) as caught:
            train(_options(data, run, tiny, resume=True), log=_quiet)
        assert _snapshot(run) == tampered  # nothing written by the refused run
    finally:
        shutil.rmtree(checkpoint)
        shutil.move(kept, checkpoint)
    assert _snapshot(run) == before
    message = str(caught.value)
    assert "\n" not in message and f"checkpoint-3/{name}" in message, message
    assert not (run.parent / "pwned").exists(), "a pickle in the checkpoint ran its code"


def test_a_genuine_checkpoint_resumes(run, data, tiny) -> None:
    """The last test of the module: it changes the run (checkpoint 3 removed, step 3 trained again)."""
    shutil.rmtree(run / "checkpoints" / "checkpoint-3")
    result = train(_options(data, run, tiny, resume=True), log=_quiet)
    assert result.steps == 3 and (run / "checkpoints" / "checkpoint-3" / "trainer_state.json").is_file()
    assert (run / "notes.txt").read_text() == "the user's notes\n"
