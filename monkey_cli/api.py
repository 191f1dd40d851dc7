"""The Python API: `from monkey_cli import Monkey`.

    m = Monkey.load("path/to/checkpoint", device="cpu")
    m.ask("invoice.pdf", "What is the total?")              # a one-page document: one answer
    m.ask("report.pdf", "Who wrote it?", page=1)           # one page of a longer one
    m.caption("scan.tiff")                                  # several pages: one answer per page, in a list
    m.generate([img1, img2], ["<img></img> What is the title? Answer: "] * 2)   # batched

    t = Monkey.load("path/to/TextMonkey")                   # the family is read from the checkpoint's config
    t.spot("scan.png").spans                                # every text with its box (page pixels, PDF points)
    t.ask("invoice.pdf", "What is the total?", ground=True) # the answer and where on the page it was read

Everything the CLI does goes through this class; it holds the model, the tokenizer and the image processor.
Generation runs on the engine (`monkey_cli.engine`: static KV cache, a compiled decode step with `compile=True`,
continuous batching over `batch_size` slots, shared image prefixes); `hf_generate_ids` keeps transformers'
`generate()` as the reference path.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monkey_cli import tasks
from monkey_cli.errors import MonkeyError
from monkey_cli.tasks import Prompt

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from monkey_cli.documents import Page
    from monkey_cli.engine.scheduler import Scheduler
    from monkey_cli.extract import Extraction
    from monkey_cli.model.configuration import MonkeyConfig
    from monkey_cli.model.memory import Choice, MemoryPlan
    from monkey_cli.model.modeling import MonkeyForCausalLM
    from monkey_cli.model.processor import MonkeyImageProcessor
    from monkey_cli.model.tokenizer import QWenTokenizer

DEFAULT_MAX_NEW_TOKENS = 512
DEFAULT_BATCH_SIZE = 4
# What `generate` takes besides prompts and images; anything else belongs to transformers (`hf_generate_ids`).
SAMPLING_OPTIONS = ("min_new_tokens", "do_sample", "temperature", "top_p", "top_k", "seed")
# Where the library says what it decided for the user (an automatic --quant, a lowered batch size).
log = logging.getLogger("monkey_cli")


# The log record's attribute that holds a message in the command line's terms: the CLI prints that one (it
# speaks in flags), anyone else gets the library's own words (`Monkey.load`'s keyword arguments).
CLI_WORDS = "cli_message"


def say_choice(choice: Choice) -> None:
    """Log what the memory plan decided (an automatic quantization, a lowered batch size), if anything."""
    if choice.api_note:
        log.warning(choice.api_note, extra={CLI_WORDS: choice.note})


class PromptTooLongError(MonkeyError):
    """A prompt and its answer would not fit in the model's context."""


@dataclass
class Monkey:
    """A loaded Monkey model ready to answer questions about documents and images.

    `family` is "monkey" or "textmonkey" (the vision tower and the prompt forms it was trained on);
    `chat` says whether the checkpoint is Monkey-Chat (its caption prompt differs); `batch_size` is the
    most sequences the memory plan allows at once (the engine's decode slots); `sampling` holds the
    checkpoint's sampling defaults (from its generation_config.json), used when a caller passes
    `do_sample=True`; `compile` says whether the engine's decode step is compiled (None: decided from the work,
    see `Scheduler`); `sequence_tokens` is the longest prompt + answer the memory plan was made for, which
    sizes the engine's cache once (a longer request still works, after the cache grows).
    """

    model: MonkeyForCausalLM
    tokenizer: QWenTokenizer
    processor: MonkeyImageProcessor
    name: str = "monkey"
    quant: str = "none"
    chat: bool = False
    batch_size: int = 1
    sampling: dict[str, Any] = field(default_factory=dict)
    compile: bool | None = False
    adapter: str | None = None  # the LoRA adapter folder applied on top of the checkpoint, if any
    family: str = "monkey"
    sequence_tokens: int | None = None
    _scheduler: Scheduler | None = field(default=None, init=False, repr=False)
    _calls: Any = field(default_factory=itertools.count, init=False, repr=False)

    @classmethod
    def load(
        cls,
        source: str | os.PathLike[str] = tasks.DEFAULT_MODEL,
        *,
        device: str = "auto",
        dtype: str | None = None,
        quant: str | None = None,
        quant_vision: bool = False,
        seq_length: int | None = None,
        prompt_style: str = "auto",
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        prompts: Sequence[Prompt | str] = (),
        compile: bool | None = None,
        adapter: str | Path | None = None,
        family: str | None = None,
    ) -> Monkey:
        """Load a checkpoint from a local folder or a Hugging Face hub id (downloaded into the HF cache).

        device: "auto" (the GPU with the most free memory, else CPU), "cpu", "cuda" or "cuda:N".
        dtype: "auto"/None (the checkpoint's own precision where the device runs it, see `resolve_dtype`),
        "bfloat16", "float16" or "float32".
        quant: "auto"/None picks, from the memory plan, the most faithful option that fits the device
        (none, then 8bit, then 4bit, then also the vision tower), and logs what and why; or "none", "8bit",
        "4bit". The plan is made for `batch_size` pages of the longest of `prompts` (those that fit the
        context) with answers of `max_new_tokens`; `batch_size` is lowered to what fits (logged too).
        prompt_style: "auto" (Monkey-Chat when its name or path says "Monkey-Chat", as the original
        decides), "chat" or "base".
        compile: capture the engine's decode step with torch.compile (CUDA graphs on a GPU); None: on CUDA
        when the work is worth it (more than a round of decode slots, or several thousand tokens; compiling
        costs tens of seconds, less once torch's on-disk compile cache is warm), never on the CPU (where
        compiling costs more than it saves). Both give the same tokens.
        adapter: a LoRA adapter folder from `monkey finetune`, applied unmerged (so it works on a quantized base).
        family: "monkey" or "textmonkey"; None or "auto" reads it from config.json (TextMonkey's `visual` keys).
        """
        from monkey_cli.model.configuration import check_family, load_config
        from monkey_cli.model.loading import load_model, sampling_defaults
        from monkey_cli.model.processor import MonkeyImageProcessor
        from monkey_cli.model.sources import display_name, resolve_device, resolve_source, warn_if_slow
        from monkey_cli.model.tokenizer import QWenTokenizer

        tasks.is_chat_checkpoint(style=prompt_style)  # a bad style fails before any work
        family = check_family(family)
        if adapter is not None:  # a bad folder fails now, not after loading the weights
            from monkey_cli.finetune.adapters import check_adapter_dir

            check_adapter_dir(adapter)
        folder = resolve_source(source)
        device = resolve_device(device)
        overrides = {"seq_length": _positive(seq_length, "seq_length")} if seq_length is not None else None
        config = load_config(folder, family)
        config.update(overrides or {})
        tokenizer = QWenTokenizer.from_dir(folder, image_token_span=config.tokens_per_image)
        _check_tokenizer(tokenizer, config, folder)
        lengths = [len(_encode(tokenizer, p)) for p in prompts]
        fitting = [n for n in lengths if n + max_new_tokens <= config.max_position_embeddings]
        choice = _choose(
            config, device, dtype, quant, quant_vision, batch_size, max_new_tokens, max(fitting, default=None)
        )
        say_choice(choice)
        model = load_model(
            folder,
            device=device,
            dtype=dtype,
            quant=choice.plan.quant,
            quant_vision=choice.plan.quant_vision,
            config_overrides=overrides,
            family=config.family,
        )
        if adapter is not None:
            from monkey_cli.finetune.adapters import apply_adapter

            model = apply_adapter(model, adapter)
        warn_if_slow(device, model.num_parameters())
        return cls(
            model=model,
            tokenizer=tokenizer,
            processor=MonkeyImageProcessor(config.vision),
            name=display_name(source),
            quant=choice.plan.quant,
            chat=tasks.is_chat_checkpoint(source, folder, style=prompt_style),
            batch_size=choice.batch_size,
            sampling=sampling_defaults(folder),
            compile=None if compile is None else bool(compile),
            adapter=str(adapter) if adapter is not None else None,
            family=config.family,
            sequence_tokens=min(choice.plan.prompt_tokens + choice.plan.max_new_tokens, config.max_position_embeddings),
        )

    @staticmethod
    def plan(
        source: str | os.PathLike[str] = tasks.DEFAULT_MODEL,
        *,
        device: str = "auto",
        dtype: str | None = None,
        quant_vision: bool = False,
        batch_size: int = 1,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        family: str | None = None,
    ) -> list[MemoryPlan]:
        """Memory estimates for --quant none, 8bit and 4bit on `device`, from the config alone (no weights)."""
        from monkey_cli.model.loading import resolve_dtype
        from monkey_cli.model.memory import device_budget, plan_all
        from monkey_cli.model.sources import peek_config, resolve_device

        device = resolve_device(device)
        config = peek_config(source, family)
        return plan_all(
            config,
            device_budget(device),
            dtype=resolve_dtype(dtype, device, config),
            quant_vision=quant_vision,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
        )

    @staticmethod
    def choose(
        source: str | os.PathLike[str] = tasks.DEFAULT_MODEL,
        *,
        device: str = "auto",
        dtype: str | None = None,
        quant: str | None = None,
        quant_vision: bool = False,
        batch_size: int = 1,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        family: str | None = None,
    ) -> Choice:
        """What `load` would pick for quant and batch size, from the config alone (no weights, no prompts:
        a short question is assumed). Raises MemoryBudgetError when nothing fits."""
        from monkey_cli.model.sources import peek_config, resolve_device

        device = resolve_device(device)
        config = peek_config(source, family)
        return _choose(config, device, dtype, quant, quant_vision, batch_size, max_new_tokens, None)

    # --- tasks --------------------------------------------------------------------------------------
    # A document is a PIL image, a `Page`, or the path of an image, a PDF or a multi-page TIFF. The answer
    # is one string for one page (an image, a Page, a one-page file, or `page=N`) and a list with one
    # answer per page for a document of several pages.

    def ask(
        self,
        document: Any,
        question: str,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        *,
        page: int | None = None,
        ground: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Answer one question about a document (one answer per page, see above). With `ground` (TextMonkey),
        each answer is a `Grounded` result: its text and the positions it was read at."""
        prompt = tasks.vqa_prompt(question, self.family, ground=ground)
        if ground:
            return self._grounded(document, page, prompt, max_new_tokens, kwargs, "ask")
        return self._per_page(document, page, prompt, max_new_tokens, kwargs)

    def caption(
        self, document: Any, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, *, page: int | None = None, **kwargs: Any
    ) -> str | list[str]:
        """A detailed caption, in the form the loaded checkpoint was trained on (Monkey-Chat or base; TextMonkey
        has none: UnsupportedTask)."""
        return self._per_page(document, page, tasks.caption_prompt(self.chat, self.family), max_new_tokens, kwargs)

    def read(
        self, document: Any, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, *, page: int | None = None, **kwargs: Any
    ) -> str | list[str]:
        """Dense text extraction by the model ("Read all the text in the image."), also for born-digital PDFs."""
        prompt = tasks.task_prompt("read", family=self.family)
        return self._per_page(document, page, prompt, max_new_tokens, kwargs)

    def spot(
        self, document: Any, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, *, page: int | None = None, **kwargs: Any
    ) -> Any:
        """Text spotting (TextMonkey, "OCR with grounding:"): every text of each page with its box, as a
        `Grounded` result per page (`.text` one text per line, `.spans` with page pixels and PDF points)."""
        prompt = tasks.spot_prompt(self.family)
        return self._grounded(document, page, prompt, max_new_tokens, kwargs, "spot")

    def locate(
        self,
        document: Any,
        text: str,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        *,
        page: int | None = None,
        **kwargs: Any,
    ) -> Any:
        """Where `text` is on each page (TextMonkey's `<ref>TEXT</ref>` prompt), as a `Grounded` result per page."""
        prompt = tasks.locate_prompt(text, self.family)
        return self._grounded(document, page, prompt, max_new_tokens, kwargs, "locate", name=text)

    def extract(
        self,
        document: Any,
        schema: Any,
        *,
        pages: str | Sequence[int] | None = None,
        max_new_tokens: int = 64,
        min_confidence: float | None = None,
        all_pages: bool = False,
        null_probability: bool = True,
    ) -> Extraction[Any]:
        """Fields out of a document, as validated values with the model's confidence (`monkey_cli.extract`).

        `schema`: a JSON Schema object (a dict), a pydantic model class (the result's `.model` is then its
        instance), an `ExtractSchema`, a list of `name:type=question` strings, or a JSON Schema file's path. Every
        field is asked of every page (or of `pages`, e.g. "1-2"), its answer constrained to its type; the most
        confident page wins. Returns an `Extraction`: `.values`, `.fields[name].confidence`, `.page`, ...
        """
        from monkey_cli.documents import Page, load_documents
        from monkey_cli.extract import ExtractOptions, coerce_schema, extract_pages

        extract_schema = coerce_schema(schema)
        options = ExtractOptions(
            max_new_tokens=max_new_tokens,
            min_confidence=min_confidence,
            all_pages=all_pages,
            null_probability=null_probability,
            batch_size=self.batch_size,
        )
        if isinstance(document, Page):
            page_list = [document]
        elif isinstance(document, (str, os.PathLike)):
            page_list = load_documents([document], size=self.processor.input_size, pages=pages)
        else:
            images, _ = self._images_of(document, None)
            page_list = [_image_page(images[0])]
        return extract_pages(self, page_list, extract_schema, options)

    def _per_page(
        self, document: Any, page: int | None, prompt: Prompt, max_new_tokens: int, kwargs: dict[str, Any]
    ) -> str | list[str]:
        images, one = self._images_of(document, page)
        answers = self.generate(images, [prompt] * len(images), max_new_tokens=max_new_tokens, **kwargs)
        return answers[0] if one else answers

    def _grounded(
        self,
        document: Any,
        page: int | None,
        prompt: Prompt,
        max_new_tokens: int,
        kwargs: dict[str, Any],
        how: str,
        name: str | None = None,
    ) -> Any:
        """Grounded results for each page: the answer's texts with their positions on that page."""
        from monkey_cli.grounding import Grounded

        pages, one = self._pages_of(document, page)
        images = [p.image for p in pages]
        rows = self.generate_ids(images, [prompt] * len(pages), max_new_tokens=max_new_tokens, **kwargs)
        results = [
            Grounded.of(self.tokenizer.decode_grounded(row), p, lines=how == "spot", unnamed=name)
            for row, p in zip(rows, pages, strict=True)
        ]
        return results[0] if one else results

    def _images_of(self, document: Any, page: int | None) -> tuple[list[Any], bool]:
        """The page images of `document` and whether it counts as one page."""
        pages, one = self._pages_of(document, page)
        return [p.image for p in pages], one

    def _pages_of(self, document: Any, page: int | None) -> tuple[list[Page], bool]:
        """The pages of `document` at the model's input size (a PIL image becomes one page) and whether it counts
        as one page."""
        from PIL import Image

        from monkey_cli.documents import Page, load_documents

        if isinstance(document, (Image.Image, Page)):
            if page not in (None, 1):
                raise ValueError(f"page={page}: an image or Page has only page 1")
            if isinstance(document, Page):
                return [document], True
            image_page = Page("<image>", 1, 1, document, "image", document.size, document.info.get("dpi"))
            return [image_page], True
        if not isinstance(document, (str, os.PathLike)):
            raise TypeError(f"expected a PIL image, a Page or a path, got {type(document).__name__}")
        size = self.processor.input_size
        selected = None if page is None else [page]
        pages: list[Page] = load_documents([document], size=size, pages=selected, text_layer=False)  # images only
        return pages, page is not None or len(pages) == 1

    # --- batched generation -------------------------------------------------------------------------
    def preprocess(self, image: Any) -> torch.Tensor:
        """One page (PIL image or path) as the vision tower takes it: [views, 3, 448, 448], float32 on the CPU.

        Pure CPU work: call it ahead (e.g. on a prefetch thread) and pass the result as the image."""
        import torch

        batch = self.processor([image])
        return torch.cat([batch.windows, batch.global_view[:, None]], dim=1)[0]

    def encode_images(self, images: Sequence[Any]) -> torch.Tensor:
        """Vision features for images (PIL, paths, or `preprocess` results): [images, tokens_per_image, hidden]."""
        import torch

        pixel_values = torch.stack([img if isinstance(img, torch.Tensor) else self.preprocess(img) for img in images])
        device = self.model.transformer.visual.conv1.weight.device
        with torch.inference_mode():
            return self.model.encode_images(pixel_values.to(device, non_blocking=True))

    def scheduler(self, slots: int | None = None) -> Scheduler:
        """The engine that runs this model's generation, with `slots` decode slots (default `batch_size`).

        One scheduler is kept (its cache and compiled step are reused); asking for another slot count replaces
        it. Drive it with `submit` and `step`, or wrap it in `monkey_cli.engine.EngineLoop` for many threads.
        """
        from monkey_cli.engine.scheduler import Scheduler

        slots = slots or self.batch_size
        if self._scheduler is None or self._scheduler.slots != slots:
            self._scheduler = None  # free the old cache first
            self._scheduler = Scheduler(
                self.model,
                self.encode_images,
                slots=slots,
                compile=self.compile,
                max_length=self.sequence_tokens,
                vocab_limit=len(self.tokenizer) if self.tokenizer is not None else None,
            )
        return self._scheduler

    @property
    def context_tokens(self) -> int:
        """The longest sequence (prompt, image span included, plus answer) the model takes."""
        return self.model.config.max_position_embeddings

    def check_prompt(self, prompt: Prompt | str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> list[int]:
        """The prompt's ids, or PromptTooLongError when the prompt and an answer of `max_new_tokens` would not
        fit in the model's context. Nothing runs: call it before the model does."""
        ids = _encode(self.tokenizer, prompt)
        if len(ids) + max_new_tokens > self.context_tokens:
            image = self.tokenizer.image_token_span + 2
            raise PromptTooLongError(
                f"the prompt is {len(ids):,} tokens ({image:,} of them the image) and the answer may take "
                f"{max_new_tokens:,} more, over the model's context of {self.context_tokens:,} tokens: "
                "shorten the question (or lower --max-new-tokens)"
            )
        return ids

    def sampling_params(self, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, **options: Any) -> Any:
        """`SamplingParams` from `generate`'s keyword arguments: greedy with min_new_tokens=1 by default;
        `do_sample=True` samples with the checkpoint's own settings (`sampling`) unless overridden."""
        from monkey_cli.engine.sampling import SamplingParams

        unknown = sorted(set(options) - set(SAMPLING_OPTIONS))
        if unknown:
            raise TypeError(
                f"generate() got unexpected keyword argument(s) {', '.join(unknown)}; it takes "
                f"{', '.join(SAMPLING_OPTIONS)} (use hf_generate_ids for transformers' generate() options)"
            )
        if options.get("do_sample"):
            options = {**self.sampling, **options}
        return SamplingParams(max_new_tokens=max_new_tokens, **options)

    def generate(
        self,
        images: Sequence[Any] | None,
        prompts: Sequence[Prompt | str],
        *,
        image_embeds: torch.Tensor | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        on_token: Callable[[int, int], None] | None = None,
        **sampling: Any,
    ) -> list[str]:
        """One answer per (image, prompt), greedy by default, through the engine (continuous batching).

        A prompt is a `tasks.Prompt` (text before and after the image) or a string whose first
        `<img>...</img>` marks the image; all other text is plain text to the model, special-token
        look-alikes included. Pass `image_embeds` (from `encode_images`, one row per prompt) instead of
        images to reuse vision features. The same image object given for several prompts is encoded once and
        its prompt prefix prefilled once. Keyword options: min_new_tokens (default 1), do_sample,
        temperature, top_p, top_k, seed; `on_token(prompt_index, token_id)` sees each token as it comes.
        """
        ids = self.generate_ids(
            images, prompts, image_embeds=image_embeds, max_new_tokens=max_new_tokens, on_token=on_token, **sampling
        )
        return [tasks.clean_answer(self.tokenizer.decode(row, skip_special_tokens=True)) for row in ids]

    def generate_ids(
        self,
        images: Sequence[Any] | None,
        prompts: Sequence[Prompt | str],
        *,
        image_embeds: torch.Tensor | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        on_token: Callable[[int, int], None] | None = None,
        **sampling: Any,
    ) -> list[list[int]]:
        """Like `generate`, but returns the new token ids of each answer (without <|endoftext|>).

        At least one token is generated (min_new_tokens=1, as every call site of the original) unless the
        caller passes another min_new_tokens.
        """
        from monkey_cli.engine.scheduler import GenerationRequest

        rows = [self.check_prompt(prompt, max_new_tokens) for prompt in prompts]
        _check_images(images, image_embeds, len(rows))
        params = self.sampling_params(max_new_tokens, **sampling)
        call = next(self._calls)  # image keys never meet an earlier call's (the engine keeps features a while)
        requests = []
        for index, ids in enumerate(rows):
            callback = None if on_token is None else _bind(on_token, index)
            if image_embeds is not None:
                request = GenerationRequest(ids, image_embeds=image_embeds[index], params=params, on_token=callback)
            else:
                image = images[index]
                key = ("generate", call, id(image))  # the same object for several prompts: encoded once
                request = GenerationRequest(ids, image=image, image_key=key, params=params, on_token=callback)
            requests.append(request)
        return [result.token_ids for result in self.scheduler().run(requests)]

    def hf_generate_ids(
        self,
        images: Sequence[Any] | None,
        prompts: Sequence[Prompt | str],
        *,
        image_embeds: torch.Tensor | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        **generate_kwargs: Any,
    ) -> list[list[int]]:
        """`generate_ids` through transformers' `generate()` (one left-padded batch, its DynamicCache): the
        eager reference path, which takes any of its options (streamer, logits_processor, ...)."""
        import torch

        rows = [self.check_prompt(prompt, max_new_tokens) for prompt in prompts]
        _check_images(images, image_embeds, len(rows))
        if image_embeds is None:
            image_embeds = self.encode_images(images)
        generate_kwargs.setdefault("min_new_tokens", 1)
        if generate_kwargs.get("do_sample"):
            generate_kwargs = {**self.sampling, **generate_kwargs}
        input_ids, attention_mask = self.tokenizer.pad_left(rows)
        device = self.model.transformer.wte.weight.device
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                image_embeds=image_embeds.to(device),
                max_new_tokens=max_new_tokens,
                **generate_kwargs,
            )
        new_tokens = output[:, input_ids.shape[1] :].tolist()
        return [_until_eos(row, self.tokenizer.eod_id) for row in new_tokens]


def _image_page(image: Any) -> Page:
    """A PIL image as the one page of a document named `<image>`."""
    from monkey_cli.documents import Page

    return Page(source="<image>", page=1, pages=1, image=image, kind="image", original_size=image.size)


def _check_images(images: Sequence[Any] | None, image_embeds: Any, count: int) -> None:
    if image_embeds is None and (images is None or len(images) != count):
        raise ValueError("give one image per prompt")
    if image_embeds is not None and image_embeds.shape[0] != count:
        raise ValueError("give one row of image_embeds per prompt")


def _bind(on_token: Callable[[int, int], None], index: int) -> Callable[[int], None]:
    return lambda token: on_token(index, token)


def _choose(
    config: MonkeyConfig,
    device: str,
    dtype: str | None,
    quant: str | None,
    quant_vision: bool,
    batch_size: int,
    max_new_tokens: int,
    prompt_tokens: int | None,
) -> Choice:
    from monkey_cli.model.loading import resolve_dtype
    from monkey_cli.model.memory import choose, device_budget

    return choose(
        config,
        device_budget(device),
        quant=quant or "auto",
        quant_vision=quant_vision,
        batch_size=_positive(batch_size, "batch_size"),
        device=device,
        available=_available_quants(),
        dtype=resolve_dtype(dtype, device, config),
        max_new_tokens=max_new_tokens,
        prompt_tokens=prompt_tokens,
    )


def _encode(tokenizer: QWenTokenizer, prompt: Prompt | str) -> list[int]:
    prompt = prompt if isinstance(prompt, Prompt) else Prompt.parse(prompt)
    return tokenizer.encode_prompt(prompt.before, prompt.after, prompt.ref)


def _check_tokenizer(tokenizer: QWenTokenizer, config: MonkeyConfig, folder: Path) -> None:
    """The vocabulary and config.json must agree on the image tags and fit in the embedding table."""
    from monkey_cli.errors import TokenizerError

    if tokenizer.img_start_id != config.image_start_id:
        raise TokenizerError(
            f"{folder}: qwen.tiktoken puts <img> at id {tokenizer.img_start_id} but config.json says "
            f"visual.image_start_id {config.image_start_id}: the vocabulary is not this checkpoint's"
        )
    if len(tokenizer) > config.vocab_size:
        raise TokenizerError(
            f"{folder}: qwen.tiktoken has {len(tokenizer)} ids but the model's vocab_size is {config.vocab_size}"
        )


def _available_quants() -> tuple[str, ...]:
    """--quant choices this installation can load (torchao for 8bit, bitsandbytes for 4bit; found without
    importing them)."""
    import importlib.util

    needs = {"8bit": "torchao", "4bit": "bitsandbytes"}
    return ("none", *(quant for quant, package in needs.items() if importlib.util.find_spec(package)))


def _positive(value: Any, name: str) -> int:
    from monkey_cli.errors import UsageError

    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{name} must be a positive integer, got {value!r}")
    return value


def _until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens
