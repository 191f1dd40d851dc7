"""Prompt forms per task, as the original Monkey uses them, and answer clean-up.

The image goes between `<img>` and `</img>`; what the original writes there (the image's path) is only a
placeholder, since our model receives the pixels separately, so the templates leave it empty.
"""

from __future__ import annotations

from dataclasses import dataclass

VQA_TEMPLATE = "<img></img> {question} Answer: "
CAPTION_TEMPLATE = "<img></img> Generate the detailed caption in English: "
CAPTION_QUESTION = "Generate the detailed caption in English."
READ_QUESTION = "Read all the text in the image."

TASKS = ("ask", "caption", "read")


@dataclass(frozen=True)
class ModelCard:
    """What we know about a published checkpoint: how it wants to be asked for a caption."""

    hub_id: str
    caption_as_question: bool
    note: str


KNOWN_MODELS: dict[str, ModelCard] = {
    "echo840/Monkey-Chat": ModelCard(
        "echo840/Monkey-Chat", caption_as_question=True, note="chat-tuned; answers in full sentences (default)"
    ),
    "echo840/Monkey": ModelCard(
        "echo840/Monkey", caption_as_question=False, note="base model; short benchmark-style answers"
    ),
}
DEFAULT_MODEL = "echo840/Monkey-Chat"


def vqa_prompt(question: str) -> str:
    return VQA_TEMPLATE.format(question=question.strip())


def caption_prompt(caption_as_question: bool = False) -> str:
    """Base Monkey has a caption form of its own; Monkey-Chat gets the request as a question."""
    return vqa_prompt(CAPTION_QUESTION) if caption_as_question else CAPTION_TEMPLATE


def task_prompt(task: str, question: str | None = None, *, caption_as_question: bool = False) -> str:
    if task == "ask":
        if not question:
            raise ValueError("the ask task needs a question")
        return vqa_prompt(question)
    if task == "caption":
        return caption_prompt(caption_as_question)
    if task == "read":
        return vqa_prompt(READ_QUESTION)
    raise ValueError(f"unknown task {task!r}")


def custom_prompt(template: str, question: str | None = None) -> str:
    """A user's --prompt template: `{question}` is filled in; an `<img></img>` span is added if missing."""
    text = template.replace("{question}", question or "")
    if "<img>" not in text:
        text = "<img></img> " + text
    return text


def clean_answer(text: str) -> str:
    """Answers are decoded without special tokens; trim the whitespace around them, as the original eval does."""
    return text.strip()
