"""Prompt forms per task, as the original Monkey uses them, and answer clean-up.

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

IMAGE_SPAN = "<img></img>"
# The original asks Monkey-Chat for a caption with the VQA form and this question (colon included);
# base Monkey gets the same words as a caption form of its own (no "Answer:").
CAPTION_QUESTION = "Generate the detailed caption in English:"
READ_QUESTION = "Read all the text in the image."

TASKS = ("ask", "caption", "read")
PROMPT_STYLES = ("auto", "chat", "base")
# As the original decides: a checkpoint whose name or path contains this is Monkey-Chat.
CHAT_MARKER = "Monkey-Chat"

_FIRST_IMAGE_SPAN = re.compile(r"<img>.*?</img>", re.DOTALL)


@dataclass(frozen=True)
class Prompt:
    """Plain text before the image and after it; the image span between them is the only special part."""

    before: str
    after: str

    def __str__(self) -> str:
        return f"{self.before}{IMAGE_SPAN}{self.after}"

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


def vqa_prompt(question: str) -> Prompt:
    """`<img></img> {question} Answer: `, the original's VQA form."""
    return Prompt("", f" {question.strip()} Answer: ")


def caption_prompt(chat: bool = False) -> Prompt:
    """Monkey-Chat: the VQA form with CAPTION_QUESTION; base Monkey: `<img></img> {CAPTION_QUESTION} `."""
    return vqa_prompt(CAPTION_QUESTION) if chat else Prompt("", f" {CAPTION_QUESTION} ")


def task_prompt(task: str, question: str | None = None, *, chat: bool = False) -> Prompt:
    if task == "ask":
        if not question:
            raise ValueError("the ask task needs a question")
        return vqa_prompt(question)
    if task == "caption":
        return caption_prompt(chat)
    if task == "read":
        return vqa_prompt(READ_QUESTION)
    raise ValueError(f"unknown task {task!r}")


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
