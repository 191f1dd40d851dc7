"""Request and response bodies in OpenAI's shapes (chat completions, models, errors), and this server's own.

A chat request is read the way OpenAI's clients send it, and nothing in it is silently dropped: the fields
this server honours are declared here; the others are judged by `completions.check_supported` (accepted
when they change nothing in an answer, such as `user` or `metadata`, or when they hold their neutral value,
such as `tools: []`; otherwise a 400 naming them). Numbers are bounded to what decoding can honour: a
temperature or top_p too close to 0 overflows the sampler's arithmetic (its probabilities become NaN), and a
seed outside 64 bits cannot seed a generator; each is a 400 naming the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MIN_TEMPERATURE = 0.01  # a positive temperature below it is refused: 0 is greedy, as the original decodes
MAX_TEMPERATURE = 2.0
MIN_TOP_P = 0.001
MAX_TOP_K = 1_000_000  # far beyond any vocabulary: the cut is then no cut
MAX_TOKENS = 1_000_000  # what a client may ask for; the server's --max-new-tokens caps it anyway
SEED_RANGE = (-(2**63), 2**64 - 1)  # what a torch generator takes
MAX_CHOICES = 128  # OpenAI's own bound on n; the server's --max-answers may lower it
MAX_STOPS = 4  # as OpenAI
MAX_STOP_CHARS = 1000
MAX_TOP_LOGPROBS = 20


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


class TextFormat(_Request):
    type: Literal["text"]


class JSONObjectFormat(_Request):
    type: Literal["json_object"]


class JSONSchemaSpec(_Request):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str | None = Field(None, max_length=64, description="Accepted (OpenAI requires it); not used.")
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema", description="The JSON Schema every answer is valid for.")
    strict: bool | None = Field(None, description="true: every keyword enforced, or a 400 naming the others.")


class JSONSchemaFormat(_Request):
    type: Literal["json_schema"]
    json_schema: JSONSchemaSpec


ResponseFormat = Annotated[TextFormat | JSONObjectFormat | JSONSchemaFormat, Field(discriminator="type")]


class ChatCompletionRequest(_Request):
    # Fields not declared here are kept (model_extra) for `completions.check_supported` to judge.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str | None = Field(None, description="Accepted and ignored: the server serves one model.")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS, description="Wins over max_tokens.")
    temperature: float | None = Field(
        None, ge=0, le=MAX_TEMPERATURE, description=f"0 or absent: greedy (the original's); else {MIN_TEMPERATURE}-2."
    )
    top_p: float | None = Field(None, ge=MIN_TOP_P, le=1)
    top_k: int | None = Field(None, ge=0, le=MAX_TOP_K, description="0: no top-k cut (not an OpenAI field).")
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    n: int | None = Field(None, ge=1, le=MAX_CHOICES, description="Choices; greedy ones are all the same.")
    stop: str | list[str] | None = Field(None, description=f"Up to {MAX_STOPS} strings the answer ends before.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, got {len(stops)}")
        for stop in stops:
            if not stop:
                raise ValueError("a stop string must not be empty")
            if len(stop) > MAX_STOP_CHARS:
                raise ValueError(f"a stop string has at most {MAX_STOP_CHARS} characters, got {len(stop)}")
        return value

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float | None) -> float | None:
        if value is not None and 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or from {MIN_TEMPERATURE} to {MAX_TEMPERATURE:g}, got {value!r}")
        return value


# --- chat completions: the response --------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int = Field(description="The prompt's tokens, the image's 1,280 positions and its tags included.")
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class TopLogprob(BaseModel):
    token: str = Field(description="The token's text (bytes that are part of a character as \\xNN escapes).")
    logprob: float = Field(description="The model's own log-probability (float32 log-softmax), before any change.")
    bytes: list[int] | None = Field(description="The token's UTF-8 bytes; null for a special token.")


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: ChoiceLogprobs | None = None


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
    logprobs: ChoiceLogprobs | None = None


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
    # What decides the answers besides the request (a `monkey ... --server` client's resume fingerprint).
    max_new_tokens: int | None = Field(None, description="The longest answer a request gets (--max-new-tokens).")
    dtype: str | None = Field(None, description="--dtype as the server was started with (null: auto).")
    quant_vision: bool | None = None
    prompt_style: str | None = None
    family: str | None = None
    adapter_sha256: str | None = Field(None, description="The --adapter's content hash (null: none).")
    max_questions: int | None = Field(
        None, description="The most questions (or /v1/extract fields) one request may ask (--max-questions)."
    )


class Liveness(BaseModel):
    """/health without the API key of a server that has one: whether it is up, and nothing else."""

    status: Literal["loading", "warming", "ready", "failed"]
    key_required: Literal[True] = Field(True, description="The details need 'Authorization: Bearer KEY'.")


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
