"""`monkey finetune` data: the original's conversation format, answer-only labels, the bad-data rule, batches."""

from __future__ import annotations

import json
from pathlib import Path

import pymupdf
import pytest
import torch
from conftest import require_parity
from PIL import Image

from monkey_cli.finetune.collator import MonkeyCollator
from monkey_cli.finetune.data import IGNORE_INDEX, DataError, MonkeyDataset, encode_example, load_data
from monkey_cli.model.configuration import load_config
from monkey_cli.model.processor import MonkeyImageProcessor
from monkey_cli.model.tokenizer import QWenTokenizer

SIZE = (896, 896)


@pytest.fixture(scope="module")
def sharp() -> Path:
    return require_parity("tiny-monkey-sharp")


@pytest.fixture(scope="module")
def tokenizer(sharp) -> QWenTokenizer:
    return QWenTokenizer.from_dir(sharp, image_token_span=load_config(sharp).tokens_per_image)


def item(image: str, question: str = "What is the total?", answer: str = "42", **extra) -> dict:
    return {
        "conversations": [
            {"from": "user", "value": f"<img>{image}</img> {question} Answer: "},
            {"from": "assistant", "value": answer},
        ],
        **extra,
    }


def png(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 48), colour).save(path)
    return path


def pdf(path: Path, pages: int) -> Path:
    doc = pymupdf.open()
    for number in range(pages):
        page = doc.new_page(width=200, height=200)
        page.draw_rect(pymupdf.Rect(0, 0, 100 + 30 * number, 200), color=None, fill=(0, 0, 1))
    doc.save(path)
    doc.close()
    return path


def write_json(path: Path, items: list) -> Path:
    path.write_text(json.dumps(items), encoding="utf-8")
    return path


def load(path: Path, tokenizer: QWenTokenizer, max_length: int = 2048):
    return load_data(path, tokenizer, max_length=max_length, image_size=SIZE)


def test_labels_cover_the_answer_and_the_closing_endoftext_only(tokenizer):
    prompt = "<img></img> What is the total? Answer: "
    ids, labels = encode_example(tokenizer, prompt, "1,234.50 EUR")
    prompt_ids = tokenizer.encode(prompt)
    answer_ids = tokenizer.encode("1,234.50 EUR")
    # As the original's preprocess: question and answer tokenized apart, concatenated, then <|endoftext|>.
    assert ids == prompt_ids + answer_ids + [tokenizer.eod_id]
    assert labels == [IGNORE_INDEX] * len(prompt_ids) + answer_ids + [tokenizer.eod_id]
    assert len(prompt_ids) == tokenizer.image_token_span + 2 + len(tokenizer.encode(" What is the total? Answer: "))


def test_json_list_and_json_lines_give_the_same_examples(tmp_path, tokenizer):
    png(tmp_path / "scans" / "a.png")
    png(tmp_path / "scans" / "b.png", colour=(0, 0, 0))
    items = [item("scans/a.png", answer="INV-7", id="x"), item("scans/b.png", "Who signed?", "Alice")]
    listed = load(write_json(tmp_path / "train.json", items), tokenizer)
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(i) for i in items) + "\n\n", encoding="utf-8")
    lines = load(tmp_path / "train.jsonl", tokenizer)
    assert listed.skipped == lines.skipped == []
    assert [e.input_ids for e in listed.examples] == [e.input_ids for e in lines.examples]
    first = listed.examples[0]
    assert first.image == tmp_path / "scans" / "a.png"  # relative to the data file, not the working folder
    assert first.prompt == "<img></img> What is the total? Answer: "  # the path is only a placeholder
    assert first.answer == "INV-7" and first.page is None
    assert first.name == "train.json: item 1 (id 'x')"
    assert lines.examples[1].name == "train.jsonl: line 2"


def test_each_bad_item_is_skipped_with_one_line_naming_it(tmp_path, tokenizer):
    png(tmp_path / "ok.png")
    pdf(tmp_path / "two.pdf", pages=2)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    no_assistant = item("ok.png")
    no_assistant["conversations"] = no_assistant["conversations"][:1]
    three_turns = item("ok.png")
    three_turns["conversations"].append({"from": "user", "value": "And?"})
    late_image = item("ok.png")
    late_image["conversations"][0]["value"] = "Look: <img>ok.png</img> What? Answer: "
    items = [
        item("ok.png", answer="fine"),  # 1: kept
        item("missing.png"),  # 2
        no_assistant,  # 3
        late_image,  # 4
        item("ok.png", answer="word " * 3000),  # 5: too long
        item("two.pdf"),  # 6: which page?
        item("two.pdf#page=3"),  # 7: no such page
        item("broken.png"),  # 8
        three_turns,  # 9
        item("ok.png", answer="see <img>x</img>"),  # 10
        item("ok.png", answer="  "),  # 11
        item("ok.png#page=1", page=2),  # 12
        "not an object",  # 13
        item("two.pdf#page=2", answer="page two"),  # 14: kept
    ]
    loaded = load(write_json(tmp_path / "train.json", items), tokenizer)
    assert [e.answer for e in loaded.examples] == ["fine", "page two"]
    assert loaded.total == 14
    assert len(loaded.skipped) == 12
    by_item = {int(line.split("item ")[1].split(":")[0].split(" ")[0]): line for line in loaded.skipped}
    assert sorted(by_item) == list(range(2, 14))
    assert all("\n" not in line and line.startswith("train.json: item ") for line in loaded.skipped)
    assert "image not found" in by_item[2] and "missing.png" in by_item[2]
    assert "no assistant turn" in by_item[3]
    assert "not the first thing" in by_item[4]
    assert "tokens long, more than --max-length 2048" in by_item[5]
    assert "has 2 pages" in by_item[6] and "two.pdf#page=N" in by_item[6]
    assert by_item[7].endswith("two.pdf has 2 page(s), no page 3")
    assert "broken.png" in by_item[8]
    assert "3 turns" in by_item[9]
    assert "answer holds an <img>" in by_item[10]
    assert "answer is empty" in by_item[11]
    assert "disagrees" in by_item[12]
    assert "expected an object" in by_item[13]


def test_pdf_page_by_suffix_or_field_and_the_pixels_are_that_page(tmp_path, tokenizer):
    pdf(tmp_path / "doc.pdf", pages=3)
    items = [item("doc.pdf#page=2"), item("doc.pdf", page=3), item("doc.pdf#page=2", page=2)]
    loaded = load(write_json(tmp_path / "train.json", items), tokenizer)
    assert [(e.image.name, e.page) for e in loaded.examples] == [("doc.pdf", 2), ("doc.pdf", 3), ("doc.pdf", 2)]
    dataset = MonkeyDataset(
        loaded.examples, MonkeyImageProcessor(load_config(require_parity("tiny-monkey-sharp")).vision)
    )
    page2, page3, again = (dataset[i]["pixel_values"] for i in range(3))
    assert page2.shape == (5, 3, 448, 448)
    assert torch.equal(page2, again) and not torch.equal(page2, page3)


def test_training_pixels_are_what_inference_sees(tmp_path, tokenizer, sharp):
    """The same page preprocessing as `Monkey.ask(path, ...)`: windows then the global view."""
    image = tmp_path / "photo.png"
    Image.effect_noise((300, 200), 60).convert("RGB").save(image)
    loaded = load(write_json(tmp_path / "train.json", [item("photo.png")]), tokenizer)
    processor = MonkeyImageProcessor(load_config(sharp).vision)
    pixels = MonkeyDataset(loaded.examples, processor)[0]["pixel_values"]
    batch = processor([image])
    assert torch.equal(pixels, torch.cat([batch.windows, batch.global_view[:, None]], dim=1)[0])


def test_file_level_problems_are_fatal(tmp_path, tokenizer):
    with pytest.raises(DataError, match="data file not found"):
        load(tmp_path / "nope.json", tokenizer)
    (tmp_path / "bad.json").write_text("[{", encoding="utf-8")
    with pytest.raises(DataError, match="not valid JSON"):
        load(tmp_path / "bad.json", tokenizer)
    (tmp_path / "obj.json").write_text("[1, 2]", encoding="utf-8")
    loaded = load(tmp_path / "obj.json", tokenizer)
    assert len(loaded.skipped) == 2
    with pytest.raises(DataError, match=r"no usable item \(all 2 items were skipped\)"):
        loaded.require_examples()
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="holds no items"):
        load(tmp_path / "empty.jsonl", tokenizer).require_examples()


def test_a_bad_json_line_is_one_skipped_item(tmp_path, tokenizer):
    png(tmp_path / "a.png")
    (tmp_path / "t.jsonl").write_text(json.dumps(item("a.png")) + "\n{oops\n", encoding="utf-8")
    loaded = load(tmp_path / "t.jsonl", tokenizer)
    assert len(loaded.examples) == 1
    assert loaded.skipped == ["t.jsonl: line 2: not valid JSON (Expecting property name enclosed in double quotes)"]


def test_collator_left_pads_without_loss_on_padding_and_keeps_only_the_answer_logits(tmp_path, tokenizer, sharp):
    png(tmp_path / "a.png")
    items = [item("a.png", answer="short"), item("a.png", "A much longer question than the other?", "long answer")]
    loaded = load(write_json(tmp_path / "train.json", items), tokenizer)
    dataset = MonkeyDataset(loaded.examples, MonkeyImageProcessor(load_config(sharp).vision))
    batch = MonkeyCollator(pad_id=tokenizer.eod_id)([dataset[0], dataset[1]])
    lengths = [len(e.input_ids) for e in loaded.examples]
    pad = lengths[1] - lengths[0]
    assert pad > 0
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, lengths[1])
    assert batch["pixel_values"].shape == (2, 5, 3, 448, 448)
    assert batch["attention_mask"][0].tolist() == [0] * pad + [1] * lengths[0]
    assert batch["input_ids"][0, pad:].tolist() == loaded.examples[0].input_ids
    assert (batch["input_ids"][0, :pad] == tokenizer.eod_id).all()
    assert (batch["labels"][0, :pad] == IGNORE_INDEX).all()
    assert batch["labels"][1].tolist() == loaded.examples[1].labels
    # The longest answer ("long answer" + <|endoftext|>) and the position predicting its first token.
    targets = max(sum(label != IGNORE_INDEX for label in e.labels) for e in loaded.examples)
    assert targets == len(tokenizer.encode("long answer")) + 1
    assert batch["logits_to_keep"] == targets + 1


def test_sharegpt_and_llava_role_names_read_as_the_originals(tmp_path, tokenizer):
    """`human`/`gpt` (ShareGPT, LLaVA) and `user`/`assistant` (the original) give the same examples; another
    role is still an item skipped with its name."""
    png(tmp_path / "a.png")
    original = [item("a.png", answer="42")]
    sharegpt = [item("a.png", answer="42")]
    sharegpt[0]["conversations"][0]["from"], sharegpt[0]["conversations"][1]["from"] = "human", "gpt"
    mixed = [item("a.png", answer="42")]
    mixed[0]["conversations"][0]["from"] = "human"  # the sides' names may come from either convention
    system = [item("a.png")]
    system[0]["conversations"][0]["from"] = "system"
    loaded = [load(write_json(tmp_path / f"{n}.json", items), tokenizer) for n, items in
              enumerate([original, sharegpt, mixed, system])]  # fmt: skip
    reference = loaded[0].examples[0]
    for other in loaded[1:3]:
        assert [(e.prompt, e.answer, e.input_ids, e.labels) for e in other.examples] == [
            (reference.prompt, reference.answer, reference.input_ids, reference.labels)
        ]
    assert loaded[3].skipped == ["3.json: item 1: the first turn must be from \"user\" (or \"human\"), not 'system'"]


def test_more_than_a_tenth_skipped_stops_unless_skip_bad(tmp_path, tokenizer):
    """4 of 5 items skipped used to train on the one left; more than 10% skipped now stops (before any weight
    loads), skip_bad trains on the rest, and exactly 10% still trains."""
    png(tmp_path / "a.png")
    five = [item("a.png"), *[item(f"missing-{n}.png") for n in range(4)]]
    loaded = load(write_json(tmp_path / "five.json", five), tokenizer)
    with pytest.raises(DataError) as caught:
        loaded.require_examples()
    assert str(caught.value) == (
        f"{tmp_path / 'five.json'}: 4 of 5 items were skipped, more than 10%: fix them (each is named above), or "
        "pass --skip-bad to train on the other 1"
    )
    assert loaded.require_examples(skip_bad=True) is loaded
    ten = [*[item("a.png") for _ in range(9)], item("missing.png")]
    assert len(load(write_json(tmp_path / "ten.json", ten), tokenizer).require_examples().examples) == 9
