"""Prompt forms per task and model family, as the original Monkey and TextMonkey use them, and answer clean-up.

Each family's forms are those of its original demo and eval (`PROMPT_FORMS`): Monkey's VQA form ends in
"Answer: " (eval/evaluate_vqa.py), TextMonkey's in "Answer:" (eval/evaluate_vqa_doc.py, demo_textmonkey.py),
and only TextMonkey was trained to give text positions ("OCR with grounding:", `<ref>...</ref>`, and the
"Provide the location coordinates ..." suffix of a question).

A prompt is text, an image, more text: `Prompt(before, after)`. The texts are plain text for the model
(tiktoken's ordinary encoding): `<img>`, `<|endoftext|>` or `<ref>` typed by a user are characters, never
control tokens, so no question can end the prompt early or name a file. Only the prompt's own image
span is special. Written out (`str(prompt)`) it is the original's template form, `<img></img> ... Answer: `;
what the original puts between the tags (the image's path) is only a placeholder, since our model receives
the pixels separately, so the span is left empty.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from monkey_cli.errors import UsageError
from monkey_cli.model.families import DISPLAY_NAMES, FAMILIES, MONKEY, TEXTMONKEY

IMAGE_SPAN = "<img></img>"
# The original asks Monkey-Chat for a caption with the VQA form and this question (colon included);
# base Monkey gets the same words as a caption form of its own (no "Answer:").
CAPTION_QUESTION = "Generate the detailed caption in English:"
READ_QUESTION = "Read all the text in the image."
SPOT_QUESTION = "OCR with grounding:"  # TextMonkey's text spotting (demo_textmonkey.py, "Text Spotting")
GROUND_SUFFIX = "Provide the location coordinates of the answer when answering the question."

TASKS = ("ask", "caption", "read", "spot")
PROMPT_STYLES = ("auto", "chat", "base")
# As the original decides: a checkpoint whose name or path contains this is Monkey-Chat.
CHAT_MARKER = "Monkey-Chat"

_FIRST_IMAGE_SPAN = re.compile(r"<img>.*?</img>", re.DOTALL)


@dataclass(frozen=True)
class Prompt:
    """Plain text before the image and after it; the image span between them is the only special part, but
    for `ref`: TextMonkey's grounding form `<ref>TEXT</ref>` at the end, whose tags are special tokens (TEXT
    stays plain text)."""

    before: str
    after: str
    ref: str | None = None

    def __str__(self) -> str:
        ref = "" if self.ref is None else f"<ref>{self.ref}</ref>"
        return f"{self.before}{IMAGE_SPAN}{self.after}{ref}"

    @classmethod
    def parse(cls, text: str) -> Prompt:
        """A prompt written as a string: its first `<img>...</img>` is the image (what stands between the
        tags is a placeholder and dropped); all other text, tag look-alikes included, is plain text."""
        match = _FIRST_IMAGE_SPAN.search(text)
        if match is None:
            raise ValueError(f"a prompt needs an {IMAGE_SPAN} span where the image goes: {text[:60]!r}")
        return cls(text[: match.start()], text[match.end() :])


@dataclass(frozen=True)
class ModelCard:
    """A published checkpoint and what it is for."""

    hub_id: str
    note: str


KNOWN_MODELS: dict[str, ModelCard] = {
    "echo840/Monkey-Chat": ModelCard("echo840/Monkey-Chat", note="chat-tuned; answers in full sentences (default)"),
    "echo840/Monkey": ModelCard("echo840/Monkey", note="base model; short benchmark-style answers"),
}
DEFAULT_MODEL = "echo840/Monkey-Chat"


def is_chat_checkpoint(*names: str | Path | None, style: str = "auto") -> bool:
    """Whether to use Monkey-Chat's prompt forms: `style` "chat" or "base" decides; "auto" looks for
    "Monkey-Chat" in any of `names` (the hub id or folder given, and the folder it resolved to, e.g. a
    Hugging Face cache snapshot `.../models--echo840--Monkey-Chat/snapshots/...`)."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style must be one of {', '.join(PROMPT_STYLES)}; got {style!r}")
    if style != "auto":
        return style == "chat"
    return any(CHAT_MARKER in str(name) for name in names if name is not None)


@dataclass(frozen=True)
class PromptForms:
    """How one family is asked for each task: texts after the image, `{question}` filled in; None where the
    family was not trained for the task (its original demo and eval never ask it)."""

    vqa: str
    read: str
    caption: str | None = None  # base checkpoints
    chat_caption: str | None = None  # chat-tuned ones (Monkey-Chat)
    spot: str | None = None  # text spotting: every text with its position
    ground: str | None = None  # a question whose answer comes with its position
    locate: bool = False  # `<ref>TEXT</ref>`: where is TEXT

    @property
    def positions(self) -> bool:
        """Whether the family gives text positions at all."""
        return self.spot is not None


PROMPT_FORMS: dict[str, PromptForms] = {
    MONKEY: PromptForms(
        vqa=" {question} Answer: ",
        read=f" {READ_QUESTION} Answer: ",
        caption=f" {CAPTION_QUESTION} ",
        chat_caption=f" {CAPTION_QUESTION} Answer: ",
    ),
    TEXTMONKEY: PromptForms(
        vqa=" {question} Answer:",
        read=f" {READ_QUESTION}",
        spot=f" {SPOT_QUESTION}",
        ground=" {question} " + GROUND_SUFFIX,
        locate=True,
    ),
}


def prompt_forms(family: str = MONKEY) -> PromptForms:
    if family not in PROMPT_FORMS:
        raise ValueError(f"model family must be one of {', '.join(FAMILIES)}; got {family!r}")
    return PROMPT_FORMS[family]


class UnsupportedTask(UsageError):
    """The model family was never trained for this task (one line for the user, exit code 2)."""


def refuse_positions(family: str) -> UnsupportedTask:
    """The refusal for a family without text positions (the original Monkey's code neither asks for nor parses
    `<ref>`/`<box>` output: its demo.py defines a box pattern it never uses)."""
    return UnsupportedTask(
        f"{DISPLAY_NAMES[family]} checkpoints give no text positions (it was not trained for them); "
        "spot, read --positions and ask --ground need a TextMonkey checkpoint"
    )


def vqa_prompt(question: str, family: str = MONKEY, *, ground: bool = False) -> Prompt:
    """`<img></img> {question} Answer: ` (Monkey), `... Answer:` (TextMonkey); with `ground`, TextMonkey's
    question asking for the answer's position too."""
    forms = prompt_forms(family)
    if ground and forms.ground is None:
        raise refuse_positions(family)
    template = forms.ground if ground else forms.vqa
    return Prompt("", template.replace("{question}", question.strip()))  # type: ignore[union-attr]


def caption_prompt(chat: bool = False, family: str = MONKEY) -> Prompt:
    """Monkey-Chat: the VQA form with CAPTION_QUESTION; base Monkey: `<img></img> {CAPTION_QUESTION} `.
    TextMonkey has no caption form (UnsupportedTask)."""
    forms = prompt_forms(family)
    text = forms.chat_caption if chat else forms.caption
    if text is None:
        raise UnsupportedTask(
            f"{DISPLAY_NAMES[family]} has no caption prompt (its demo and eval never ask for one); "
            "use ask, read, or caption with --prompt TEMPLATE"
        )
    return Prompt("", text)


def spot_prompt(family: str = TEXTMONKEY) -> Prompt:
    """`<img></img> OCR with grounding:`: every text of the page with its position (TextMonkey)."""
    forms = prompt_forms(family)
    if forms.spot is None:
        raise refuse_positions(family)
    return Prompt("", forms.spot)


def locate_prompt(text: str, family: str = TEXTMONKEY) -> Prompt:
    """`<img></img> <ref>{text}</ref>`: where `text` is on the page (TextMonkey; the tags are special tokens)."""
    if not prompt_forms(family).locate:
        raise refuse_positions(family)
    return Prompt("", " ", ref=text)


def task_prompt(task: str, question: str | None = None, *, chat: bool = False, family: str = MONKEY) -> Prompt:
    if task == "ask":
        if not question:
            raise ValueError("the ask task needs a question")
        return vqa_prompt(question, family)
    if task == "caption":
        return caption_prompt(chat, family)
    if task == "read":
        return Prompt("", prompt_forms(family).read)
    if task == "spot":
        return spot_prompt(family)
    raise ValueError(f"unknown task {task!r}")


def shown_prompt(task: str) -> str:
    """What a record of `task` (other than ask, whose records show the question) shows as its prompt."""
    return {"read": READ_QUESTION, "spot": SPOT_QUESTION}.get(task, CAPTION_QUESTION)


def custom_prompt(template: str, question: str | None = None) -> Prompt:
    """A user's --prompt template. Its first `<img>...</img>` marks where the image goes (at the start
    when it has none); `{question}` is filled in afterwards, so a question can never add an image span."""
    match = _FIRST_IMAGE_SPAN.search(template)
    before, after = (template[: match.start()], template[match.end() :]) if match else ("", " " + template)
    fill = question or ""
    return Prompt(before.replace("{question}", fill), after.replace("{question}", fill))


def clean_answer(text: str) -> str:
    """Answers are decoded without special tokens; trim the whitespace around them, as the original eval does."""
    return text.strip()
