"""Request and response bodies in OpenAI's shapes (chat completions, models, errors), and this server's own.

Requests accept what OpenAI's clients send: fields this server has no use for (`user`, `metadata`,
`logit_bias`, `tools`, ...) are accepted and ignored, as other OpenAI-compatible servers do; fields whose
meaning it cannot honour (`n` other than 1, `stop`) are refused with a 400 naming them, rather than
silently answering something else than was asked.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


# --- chat completions: the request ---------------------------------------------------------------------


class ImageURL(_Request):
    url: str = Field(description="A data: URL (base64); a PDF may end in #page=N (default: page 1).")
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ImagePart(_Request):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Request):
    include_usage: bool = False


class ChatCompletionRequest(_Request):
    model: str | None = Field(None, description="Accepted and ignored: the server serves one model.")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Wins over max_tokens.")
    temperature: float | None = Field(None, ge=0, le=2, description="0 or absent: greedy (the original's).")
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    n: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


# --- chat completions: the response --------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int = Field(description="The prompt's tokens, the image's 1,280 positions and its tags included.")
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


# --- models, health ------------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "monkey-cli"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class EngineStats(BaseModel):
    """What the engine has done since the server started (`monkey_cli.engine.scheduler.SchedulerStats`)."""

    vision_passes: int
    images_encoded: int
    prefills: int
    prefix_prefills: int
    prefix_reuses: int
    decode_steps: int
    decoded_tokens: int
    busiest_step: int


class Health(BaseModel):
    status: Literal["loading", "warming", "ready", "failed"] = Field(
        description="warming: loaded, compiling and capturing the decode step (503 until ready)."
    )
    model: str
    quant: str | None = None
    device: str | None = None
    slots: int | None = None
    requests: int = Field(0, description="Requests for the model in progress (limit: max_queue).")
    pending: int = Field(0, description="Generations submitted and not finished (waiting or decoding).")
    max_queue: int
    engine: EngineStats | None = None
    compile: dict[str, Any] | None = Field(
        None, description="How the decode step runs: mode (cudagraphs, inductor, eager), graphs, recompiles, "
        "CUDA graphs captured or skipped, fallbacks and why (`monkey_cli.engine.step.CompileReport`).",
    )


# --- errors --------------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# --- documents: the CLI's records ----------------------------------------------------------------------


class DocumentResult(BaseModel):
    """Exactly what `monkey ask|caption|read --format json` prints: see `monkey_cli.output.Record`."""

    schema_version: int
    tool: dict[str, Any]
    records: list[dict[str, Any]]


class PreviewPage(BaseModel):
    page: int
    pages: int
    width: int = Field(description="The page's width in pixels (a PDF page at 144 dpi).")
    height: int
    image: str = Field(description="A data: URL of a small JPEG of the page, for showing it.")


class Preview(BaseModel):
    source: str
    pages: list[PreviewPage]
    errors: list[str]


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 413, 429, 503, 504)
}
