"""QWenTokenizer: parity with the original Monkey tokenizer, image spans, batching, vocabulary errors."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from monkey_cli.errors import TokenizerError
from monkey_cli.model.tokenizer import QWenTokenizer

# Offsets of the special tokens after the last BPE rank, from the layout the original documents:
# <|endoftext|>, <|im_start|>, <|im_end|>, 205 extras, 6 grounding tags, then <img>, </img>, <imgpad>.
EOD_OFFSET, IMG_START_OFFSET, IMG_END_OFFSET, IMG_PAD_OFFSET = 0, 214, 215, 216


# --- a small synthetic vocabulary (no fixtures needed) ----------------------------------------------
def _byte_for_rank(rank: int) -> bytes:
    """A permutation of the 256 bytes, so that a byte's BPE id is NOT its value (as in the real vocab)."""
    return bytes([(rank * 7 + 3) % 256])


def _write_vocab(path: Path, tokens: list[bytes]) -> Path:
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    return path


@pytest.fixture
def byte_vocab(tmp_path: Path) -> Path:
    tokens = [_byte_for_rank(rank) for rank in range(256)] + [b"ab", b"abc", b" x"]
    return _write_vocab(tmp_path / "qwen.tiktoken", tokens)


# --- the parity fixtures --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_tokenizer(parity_dir: Path) -> QWenTokenizer:
    return QWenTokenizer.from_dir(parity_dir)


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_monkey_dir: Path) -> QWenTokenizer:
    return QWenTokenizer.from_dir(tiny_monkey_dir)


@pytest.fixture(scope="module")
def special_table(parity_dir: Path) -> dict:
    return json.loads((parity_dir / "special_tokens.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def cases(parity_dir: Path) -> list[dict]:
    lines = (parity_dir / "tokenizer_cases.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _succeeding(cases: list[dict]) -> list[dict]:
    return [case for case in cases if "error" not in case]


def _decodable(cases: list[dict]) -> list[dict]:
    return [case for case in cases if "error" not in case and "decode_error" not in case]


def _reference_spans(ids: list[int], start_id: int, end_id: int) -> list[tuple[int, int]]:
    """Content positions of <img>..</img> pairs in the reference ids, found independently of the code."""
    spans, position = [], 0
    while start_id in ids[position:]:
        start = ids.index(start_id, position)
        end = ids.index(end_id, start)
        spans.append((start + 1, end))
        position = end + 1
    return spans


# --- parity with the reference on the real vocabulary ---------------------------------------------
def test_fixture_has_the_documented_cases(cases: list[dict]) -> None:
    assert len(cases) == 180
    assert len(_decodable(cases)) == 177


def test_input_ids_match_reference(real_tokenizer: QWenTokenizer, cases: list[dict]) -> None:
    mismatched = [
        case["id"] for case in _succeeding(cases) if real_tokenizer.encode(case["text"]) != case["input_ids"]
    ]
    assert mismatched == []


def test_image_spans_at_reference_positions(
    real_tokenizer: QWenTokenizer, cases: list[dict], special_table: dict
) -> None:
    with_images = [case for case in _succeeding(cases) if special_table["img_start_id"] in case["input_ids"]]
    assert len(with_images) >= 15  # the image-query category, <img></img>, the 1280-byte path
    start_id, end_id = special_table["img_start_id"], special_table["img_end_id"]
    for case in with_images:
        expected = _reference_spans(case["input_ids"], start_id, end_id)
        spans = real_tokenizer.image_spans(real_tokenizer.encode(case["text"]))
        assert spans == expected, case["id"]
        assert all(end - start == special_table["IMG_TOKEN_SPAN"] for start, end in spans), case["id"]


def test_image_span_holds_path_bytes(real_tokenizer: QWenTokenizer, cases: list[dict]) -> None:
    case = next(c for c in cases if c["id"] == "tok141")  # non-ASCII path with a space
    path = case["text"].split("<img>")[1].split("</img>")[0]
    ids = real_tokenizer.encode(case["text"])
    (start, end), = real_tokenizer.image_spans(ids)
    path_bytes = unicodedata.normalize("NFC", path).encode("utf-8")
    assert ids[start : start + len(path_bytes)] == list(path_bytes)
    assert set(ids[start + len(path_bytes) : end]) == {real_tokenizer.img_pad_id}
    assert real_tokenizer.image_paths(ids) == [path]


def test_tokens_match_reference(real_tokenizer: QWenTokenizer, cases: list[dict]) -> None:
    mismatched = []
    for case in _succeeding(cases):
        tokens = real_tokenizer.tokenize(case["text"])
        types = "".join("b" if isinstance(token, bytes) else "s" for token in tokens)
        shown = [base64.b64encode(t).decode() if isinstance(t, bytes) else t for t in tokens]
        if types != case["token_types"] or shown != case["tokens"]:
            mismatched.append(case["id"])
    assert mismatched == []


@pytest.mark.parametrize(("skip_special_tokens", "key"), [(False, "decoded"), (True, "decoded_skip")])
def test_decode_matches_reference(
    real_tokenizer: QWenTokenizer, cases: list[dict], skip_special_tokens: bool, key: str
) -> None:
    mismatched = [
        case["id"]
        for case in _decodable(cases)
        if real_tokenizer.decode(case["input_ids"], skip_special_tokens=skip_special_tokens) != case[key]
    ]
    assert mismatched == []


def test_decode_round_trips_to_nfc_text(real_tokenizer: QWenTokenizer, cases: list[dict]) -> None:
    for case in _decodable(cases):
        expected = unicodedata.normalize("NFC", case["text"])
        assert real_tokenizer.decode(real_tokenizer.encode(case["text"])) == expected, case["id"]


def test_unclosed_image_tag_raises(real_tokenizer: QWenTokenizer, cases: list[dict]) -> None:
    case = next(c for c in cases if c["id"] == "tok177")
    assert "Unclosed image token" in case["error"]
    with pytest.raises(TokenizerError, match="unclosed <img>") as info:
        real_tokenizer.encode(case["text"])
    assert "\n" not in str(info.value)


def test_too_long_image_path_raises(real_tokenizer: QWenTokenizer, cases: list[dict]) -> None:
    case = next(c for c in cases if c["id"] == "tok178")
    assert "too long" in case["error"]
    path = case["text"].split("<img>")[1].split("</img>")[0]
    with pytest.raises(TokenizerError, match=f"{len(path.encode())} bytes long; at most 1280") as info:
        real_tokenizer.encode(case["text"])
    assert "\n" not in str(info.value)


def test_path_filling_the_whole_span_encodes_but_cannot_be_decoded(
    real_tokenizer: QWenTokenizer, cases: list[dict]
) -> None:
    case = next(c for c in cases if c["id"] == "tok179")
    assert set(case["decode_error"]) == {"decoded", "decoded_skip"}
    ids = real_tokenizer.encode(case["text"])
    assert ids == case["input_ids"]
    assert real_tokenizer.img_pad_id not in ids
    for skip in (False, True):
        with pytest.raises(TokenizerError, match="no <imgpad>"):
            real_tokenizer.decode(ids, skip_special_tokens=skip)


# --- special-token tables -------------------------------------------------------------------------
def test_real_special_tokens_match_reference(real_tokenizer: QWenTokenizer, special_table: dict) -> None:
    assert real_tokenizer.special_tokens == special_table["special_tokens"]
    assert real_tokenizer.num_bpe_tokens == special_table["n_mergeable_ranks"]
    assert len(real_tokenizer) == real_tokenizer.vocab_size == special_table["len_tokenizer"]
    assert real_tokenizer.image_token_span == special_table["IMG_TOKEN_SPAN"]
    for name in ("eod_id", "im_start_id", "im_end_id", "img_start_id", "img_end_id", "img_pad_id",
                 "ref_start_id", "ref_end_id", "box_start_id", "box_end_id", "quad_start_id", "quad_end_id"):
        assert getattr(real_tokenizer, name) == special_table[name], name
    assert real_tokenizer.eos_token_id == real_tokenizer.pad_token_id == special_table["eod_id"]


def test_tiny_special_tokens_match_reference(tiny_tokenizer: QWenTokenizer, special_table: dict) -> None:
    tiny = special_table["tiny_monkey_tokenizer"]
    assert tiny_tokenizer.special_tokens == tiny["special_tokens"]
    assert tiny_tokenizer.num_bpe_tokens == tiny["n_mergeable_ranks"]
    assert len(tiny_tokenizer) == tiny["len_tokenizer"]
    for name in ("eod_id", "im_start_id", "im_end_id", "img_start_id", "img_end_id", "img_pad_id"):
        assert getattr(tiny_tokenizer, name) == tiny[name], name


def test_tiny_tokenizer_agrees_with_tiny_config(tiny_tokenizer: QWenTokenizer, tiny_monkey_dir: Path) -> None:
    from monkey_cli.model.configuration import load_config

    config = load_config(tiny_monkey_dir)
    assert tiny_tokenizer.img_start_id == config.image_start_id
    assert tiny_tokenizer.img_end_id == config.image_end_id
    assert tiny_tokenizer.img_pad_id == config.image_pad_id
    assert tiny_tokenizer.eod_id == config.eod_id
    assert len(tiny_tokenizer) <= config.vocab_size


def test_tiny_cases_prompts_and_generations(tiny_tokenizer: QWenTokenizer, parity_dir: Path) -> None:
    """The reference's prompt ids, image spans and decoded greedy outputs on the tiny vocabulary."""
    checked = 0
    for index in ("tiny_cases/index.json", "tiny_cases/sharp/index.json"):
        for case in json.loads((parity_dir / index).read_text(encoding="utf-8"))["cases"]:
            ids = tiny_tokenizer.encode(case["prompt"])
            assert ids == case["input_ids"], case["id"]
            assert tiny_tokenizer.image_spans(ids) == [tuple(case["image_span"])], case["id"]
            assert tiny_tokenizer.image_paths(ids) == [case["image_path"]], case["id"]
            generated = tiny_tokenizer.decode(case["generated_ids"], skip_special_tokens=True)
            assert generated.strip() == case["generated_text"], case["id"]
            checked += 1
    assert checked == 24


# --- image spans ----------------------------------------------------------------------------------
def test_empty_image_is_all_pads(byte_vocab: Path) -> None:
    tokenizer = QWenTokenizer(byte_vocab)
    n = 259  # BPE tokens in the synthetic vocabulary
    ids = tokenizer.encode("<img></img>")
    assert ids == [n + IMG_START_OFFSET] + [n + IMG_PAD_OFFSET] * 1280 + [n + IMG_END_OFFSET]
    assert tokenizer.image_spans(ids) == [(1, 1281)]
    assert tokenizer.image_paths(ids) == [""]
    assert tokenizer.decode(ids) == "<img></img>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == ""


def test_path_ids_are_byte_values_not_bpe_ids(byte_vocab: Path) -> None:
    tokenizer = QWenTokenizer(byte_vocab, image_token_span=16)
    ids = tokenizer.encode("<img>abc.png</img> x")
    assert ids[1:8] == list(b"abc.png")
    assert tokenizer.encode("abc") == [257]  # outside a span the same text is BPE-merged
    assert ids[8:17] == [tokenizer.img_pad_id] * 9
    assert ids[17:] == [tokenizer.img_end_id, 258]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "abc.png x"


@pytest.mark.parametrize("span", [1536, 1792])
def test_custom_span_length(byte_vocab: Path, span: int) -> None:
    tokenizer = QWenTokenizer.from_dir(byte_vocab.parent, image_token_span=span)
    ids = tokenizer.encode("ab<img>page.png</img>ab<img></img>")
    assert len(ids) == 1 + 2 * (span + 2) + 1
    spans = tokenizer.image_spans(ids)
    assert spans == [(2, 2 + span), (span + 5, 2 * span + 5)]
    assert tokenizer.image_paths(ids) == ["page.png", ""]
    assert tokenizer.decode(ids) == "ab<img>page.png</img>ab<img></img>"


def test_span_from_a_2x3_grid_config(byte_vocab: Path) -> None:
    from monkey_cli.model.configuration import MonkeyConfig, real_monkey_config

    visual = dict(real_monkey_config().visual, image_size=[896, 1344], lora_repeat_num=6)
    span = MonkeyConfig(visual=visual).tokens_per_image
    tokenizer = QWenTokenizer(byte_vocab, image_token_span=span)
    (start, end), = tokenizer.image_spans(tokenizer.encode("<img>scan.png</img>"))
    assert end - start == span == 7 * 256  # 6 windows + the global view


def test_path_lengths_at_the_span_limit(byte_vocab: Path) -> None:
    tokenizer = QWenTokenizer(byte_vocab, image_token_span=8)
    one_pad = tokenizer.encode("<img>1234567</img>")
    assert one_pad[1:9] == list(b"1234567") + [tokenizer.img_pad_id]
    assert tokenizer.decode(one_pad) == "<img>1234567</img>"
    assert tokenizer.encode("<img>12345678</img>")[1:9] == list(b"12345678")
    with pytest.raises(TokenizerError, match="9 bytes long; at most 8"):
        tokenizer.encode("<img>123456789</img>")
    with pytest.raises(TokenizerError, match="9 bytes long"):
        tokenizer.encode("<img>1234567é</img>")  # 8 characters, 9 bytes: the limit counts bytes


def test_special_token_inside_image_span_is_rejected(byte_vocab: Path) -> None:
    tokenizer = QWenTokenizer(byte_vocab)
    with pytest.raises(TokenizerError, match="'<\\|endoftext\\|>' inside <img>"):
        tokenizer.encode("<img>a<|endoftext|>b</img>")


def test_orphan_end_tag_is_plain_special_token(byte_vocab: Path) -> None:
    tokenizer = QWenTokenizer(byte_vocab)
    ids = tokenizer.encode("</img>ab")
    assert ids == [259 + IMG_END_OFFSET, 256]
    assert tokenizer.image_spans(ids) == []


def test_unclosed_image_in_ids(byte_vocab: Path) -> None:
    tokenizer = QWenTokenizer(byte_vocab)
    for call in (tokenizer.image_spans, tokenizer.decode):
        with pytest.raises(TokenizerError, match="unclosed <img> in the token ids"):
            call([97, tokenizer.img_start_id, 98])


def test_invalid_span_length_rejected(byte_vocab: Path) -> None:
    for bad in (0, -1, 2.5, True):
        with pytest.raises(TokenizerError, match="image_token_span"):
            QWenTokenizer(byte_vocab, image_token_span=bad)


# --- decoding details -----------------------------------------------------------------------------
def test_decode_unknown_ids(byte_vocab: Path) -> None:
    tokenizer = QWenTokenizer(byte_vocab)
    beyond = len(tokenizer) + 3  # the model's embedding table is larger than the tokenizer
    assert tokenizer.decode([256, beyond], skip_special_tokens=True) == "ab"
    with pytest.raises(TokenizerError, match=f"token id {beyond}"):
        tokenizer.decode([256, beyond])


def test_decode_replaces_invalid_utf8(byte_vocab: Path) -> None:
    tokenizer = QWenTokenizer(byte_vocab)
    e_acute = tokenizer.encode("é")  # two single-byte tokens
    assert len(e_acute) == 2
    assert tokenizer.decode(e_acute[:1] + [256]) == "\ufffdab"
    # bytes split by a skipped special token join up again, as in the reference
    eod = tokenizer.eod_id
    assert tokenizer.decode([e_acute[0], eod, e_acute[1]], skip_special_tokens=True) == "é"


def test_decode_accepts_tensors_and_ints(byte_vocab: Path) -> None:
    import torch

    tokenizer = QWenTokenizer(byte_vocab)
    ids = tokenizer.encode("abc x")
    assert tokenizer.decode(torch.tensor(ids)) == "abc x"
    assert tokenizer.decode(256) == "ab"


# --- batching -------------------------------------------------------------------------------------
def test_batch_encode_left_pads(byte_vocab: Path) -> None:
    import torch

    tokenizer = QWenTokenizer(byte_vocab, image_token_span=8)
    texts = ["<img>a.png</img> abc x", "ab", "", "<|im_start|>abc"]
    input_ids, attention_mask = tokenizer.batch_encode(texts)
    rows = [tokenizer.encode(text) for text in texts]
    longest = max(len(row) for row in rows)
    assert input_ids.dtype == attention_mask.dtype == torch.long
    assert input_ids.shape == attention_mask.shape == (len(texts), longest)
    for i, row in enumerate(rows):
        pad = longest - len(row)
        assert input_ids[i, pad:].tolist() == row
        assert input_ids[i, :pad].tolist() == [tokenizer.pad_token_id] * pad
        assert attention_mask[i].tolist() == [0] * pad + [1] * len(row)
    assert tokenizer.pad_token_id == 259 + EOD_OFFSET


def test_decoding_batch_rows_skips_pads(byte_vocab: Path) -> None:
    tokenizer = QWenTokenizer(byte_vocab, image_token_span=8)
    texts = ["<img>a.png</img> abc x", "<|im_start|>ab", "x", "ab" * 20]
    input_ids, attention_mask = tokenizer.batch_encode(texts)
    assert tokenizer.batch_decode(input_ids, attention_mask) == texts
    skipped = tokenizer.batch_decode(input_ids, skip_special_tokens=True)
    assert skipped == ["a.png abc x", "ab", "x", "ab" * 20]
    assert tokenizer.decode(input_ids[2], skip_special_tokens=True) == "x"
    # the image span moves with the padding; positions are those of the padded row
    pad = int((attention_mask[0] == 0).sum())
    assert pad > 0
    assert tokenizer.image_spans(input_ids[0]) == [(pad + 1, pad + 9)]


def test_batch_encode_of_nothing(byte_vocab: Path) -> None:
    input_ids, attention_mask = QWenTokenizer(byte_vocab).batch_encode([])
    assert tuple(input_ids.shape) == tuple(attention_mask.shape) == (0, 0)


def test_module_import_does_not_load_torch() -> None:
    code = "import sys, monkey_cli.model.tokenizer; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# --- vocabulary errors ----------------------------------------------------------------------------
def test_missing_vocab_file(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError) as info:
        QWenTokenizer.from_dir(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "qwen.tiktoken") in message
    assert "not found" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("bad_line", "cause"),
    [
        ("!!notbase64 300", "not valid base64"),
        ("YWJj", "expected 'base64-token rank'"),
        ("YWJj 300 extra", "expected 'base64-token rank'"),
        ("YWJj three", "not a non-negative integer"),
        ("YWJj -300", "not a non-negative integer"),
        ("YWJj 5", "rank 5 already given on line 6"),
        ("YWJj 301", "leaves a gap"),
        (f"{base64.b64encode(_byte_for_rank(0)).decode()} 300", "listed twice"),
    ],
)
def test_malformed_vocab_line(tmp_path: Path, bad_line: str, cause: str) -> None:
    vocab = tmp_path / "qwen.tiktoken"
    lines = [f"{base64.b64encode(_byte_for_rank(rank)).decode()} {rank}" for rank in range(256)]
    lines += [f"{base64.b64encode(f'w{rank}'.encode()).decode()} {rank}" for rank in range(256, 300)]
    vocab.write_text("\n".join([*lines, "", bad_line]) + "\n")  # a blank line still counts
    with pytest.raises(TokenizerError) as info:
        QWenTokenizer(vocab)
    message = str(info.value)
    assert message.startswith(f"{vocab}:302: ")
    assert cause in message
    assert "\n" not in message


def test_vocab_without_every_byte(tmp_path: Path) -> None:
    vocab = _write_vocab(tmp_path / "qwen.tiktoken", [bytes([b]) for b in range(255)])
    with pytest.raises(TokenizerError, match="lacks 1 single-byte token"):
        QWenTokenizer(vocab)


def test_empty_vocab(tmp_path: Path) -> None:
    vocab = tmp_path / "qwen.tiktoken"
    vocab.write_text("\n")
    with pytest.raises(TokenizerError, match="has no tokens"):
        QWenTokenizer(vocab)
