"""monkey extract: what 10 fields on a page cost against one question, and what constraining costs per token.

    python benchmarks/extract.py                         # CPU: a 32-layer stand-in with the real vocabulary
    python benchmarks/extract.py --json extract.json     # every figure, with the machine
    python benchmarks/extract.py --model path/to/checkpoint

One command, unattended. Without `--model` it writes a random-weight checkpoint (bf16 safetensors in the released
layout) into a temp folder: on a CUDA machine the released architecture (9.7B parameters, ~19.4 GB), elsewhere
the engine benchmark's CPU stand-in (32 decoder layers like the real model, 256 wide, a small vision tower),
both with the real Qwen vocabulary (`--tokenizer`, default ../shared/parity/qwen.tiktoken), so that the token
masks are computed over the real 151,936 logits.

Sections:
- vocabulary: llguidance's view of the vocabulary (built once per process), each kind's grammar compile time,
  and the mask computation per token (median over random walks through the grammar).
- page: a fresh page with one question (free decoding, its answer forced to the fields' mean answer length)
  against the same page with 10 fields of every kind (`extract_pages`: one request per field sharing the page's
  features and image prefix, its not-found answer scored in its prefill pass; and without that scoring), and
  what the scheduler did for one such page (prefill passes, decode steps, tokens). Goal: 10 fields < 2x.
- decode: the median decode step with every slot busy, free against constrained by a long free-text grammar
  (the costliest mask: almost every token allowed) and by a number grammar.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package

import engine as engine_bench  # noqa: E402  (the CPU stand-in's shape)
import model as model_bench  # noqa: E402  (shared measurements)
import quant as quant_bench  # noqa: E402  (the random checkpoint writer)

SECTIONS = ("vocabulary", "page", "decode")
REAL_VOCAB = 151936  # the released model's logits (151,851 ids padded)
DEFAULT_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "parity" / "qwen.tiktoken"
TEN_FIELDS = {
    "type": "object",
    "properties": {
        "vendor": {"type": "string", "maxLength": 32, "description": "Which company issued the invoice?"},
        "number": {"type": "string", "pattern": "[A-Z]{2,3}-[0-9]{3,6}", "description": "What is the invoice number?"},
        "issued": {"type": "string", "format": "date", "description": "When was the invoice issued?"},
        "due": {"type": "string", "format": "date", "description": "When is the payment due?"},
        "total": {"type": "number", "description": "What is the total amount due?"},
        "tax": {"type": "number", "description": "How much tax is charged?"},
        "currency": {"enum": ["USD", "EUR", "GBP"], "description": "Which currency are the amounts in?"},
        "paid": {"type": "boolean", "description": "Has the invoice been paid?"},
        "lines": {"type": "integer", "minimum": 0, "description": "How many line items are there?"},
        "items": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3,
                  "description": "What are the items?"},
    },
}


# ----------------------------------------------------------------------------------------------------
# The checkpoint
# ----------------------------------------------------------------------------------------------------
def write_checkpoint(folder: Path, device: str, tokenizer: Path) -> Path:
    from monkey_cli.model.configuration import REAL_VISUAL, real_monkey_config

    if device.startswith("cuda"):
        config = real_monkey_config()
    else:
        width = engine_bench.STANDIN_WIDTH
        visual = {**REAL_VISUAL, "width": 64, "layers": 2, "heads": 4, "output_dim": width}
        config = real_monkey_config(hidden_size=width, num_attention_heads=width // 64, kv_channels=64,
                                    num_hidden_layers=engine_bench.STANDIN_LAYERS, intermediate_size=4 * width,
                                    visual=visual)
    quant_bench.write_random_checkpoint(folder, config, tokenizer, device)
    return folder


# ----------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------
def vocabulary_section(monkey: Any, walks: int = 4, steps: int = 24) -> dict[str, Any]:
    import torch

    from monkey_cli.engine.constraints import bitmask_words
    from monkey_cli.extract import coerce_schema
    from monkey_cli.extract import constraint as constraint_module
    from monkey_cli.extract.constraint import CompiledGrammar, llguidance_tokenizer
    from monkey_cli.extract.grammar import answer_grammar

    vocab = monkey.model.config.vocab_size
    constraint_module._TOKENIZERS.clear()
    started = time.perf_counter()
    llg = llguidance_tokenizer(monkey.tokenizer, vocab)
    result: dict[str, Any] = {"vocab": vocab, "tokenizer_build_s": time.perf_counter() - started, "kinds": {}}
    bitmask = torch.full((1, bitmask_words(vocab)), -1, dtype=torch.int32)
    rng = random.Random(0)
    eos = monkey.tokenizer.eod_id
    for item in coerce_schema(TEN_FIELDS).fields:
        grammar = answer_grammar(item, 64)
        compile_ms = model_bench.time_ms(lambda g=grammar: CompiledGrammar.from_lark(g.lark, llg), "cpu", 5)
        compiled = CompiledGrammar.from_lark(grammar.lark, llg)
        masks = []
        for _ in range(walks):
            constraint = compiled.constraint()
            for _ in range(steps):
                started = time.perf_counter()
                constraint.fill_next_token_bitmask(bitmask, 0)
                masks.append((time.perf_counter() - started) * 1000)
                bits = (bitmask[0, :, None] >> torch.arange(32, dtype=torch.int32)) & 1
                allowed = [t for t in bits.flatten()[:vocab].nonzero().flatten().tolist() if t != eos]
                if not allowed:
                    break
                constraint.accept_token(rng.choice(allowed))
        result["kinds"][item.name] = {"kind": item.kind, "compile_ms": compile_ms,
                                      "mask_ms_median": statistics.median(masks), "mask_ms_max": max(masks)}
    return result


def _spy_handles() -> tuple[list[Any], Callable[[], None]]:
    from monkey_cli.engine.scheduler import Scheduler

    seen: list[Any] = []
    real = Scheduler.submit

    def spy(self: Any, request: Any) -> Any:
        handle = real(self, request)
        seen.append((request, handle))
        return handle

    Scheduler.submit = spy  # type: ignore[method-assign]
    return seen, lambda: setattr(Scheduler, "submit", real)


def page_section(monkey: Any, pages: list[Any], repeats: int) -> dict[str, Any]:
    from monkey_cli import tasks
    from monkey_cli.engine import GenerationRequest
    from monkey_cli.extract import ExtractOptions, coerce_schema, extract_pages
    from monkey_cli.extract.constraint import ForcedTokens

    device = model_bench.model_device(monkey)
    schema = coerce_schema(TEN_FIELDS)
    with_null, without_null = ExtractOptions(batch_size=monkey.batch_size), ExtractOptions(
        batch_size=monkey.batch_size, null_probability=False)
    seen, restore = _spy_handles()
    try:
        extract_pages(monkey, pages[:1], schema, with_null)  # warm-up; and the answers' lengths
    finally:
        restore()
    lengths = [len(h.wait().token_ids) + 1 for r, h in seen if not isinstance(r.constraint, ForcedTokens)]
    answer_tokens = round(statistics.mean(lengths))
    prompt = monkey.check_prompt(tasks.vqa_prompt(schema.fields[4].question), answer_tokens)
    params = engine_bench.forced(answer_tokens)
    scheduler = monkey.scheduler()

    def one_question(page: Any) -> None:
        scheduler.run([GenerationRequest(prompt, image=page.image, params=params)])

    def timed(fn: Callable[[Any], Any], page: Any) -> float:
        model_bench.synchronize(device)
        started = time.perf_counter()
        fn(page)
        model_bench.synchronize(device)
        return (time.perf_counter() - started) * 1000

    one_question(pages[0])  # warm-up
    times: dict[str, list[float]] = {"one": [], "ten": [], "ten_without_null": []}
    work: dict[str, int] = {}
    for number in range(repeats):  # interleaved, so that a change in the machine's load hits every figure alike
        page = pages[number % len(pages)]  # a page's features are never reused across runs (fresh image keys)
        times["one"].append(timed(one_question, page))
        before = dataclasses.asdict(scheduler.stats)
        times["ten"].append(timed(lambda p: extract_pages(monkey, [p], schema, with_null), page))
        work = {key: value - before[key] for key, value in dataclasses.asdict(scheduler.stats).items()
                if key != "busiest_step"}  # fmt: skip
        times["ten_without_null"].append(timed(lambda p: extract_pages(monkey, [p], schema, without_null), page))
    one, ten, ten_without_null = (statistics.median(times[key]) for key in ("one", "ten", "ten_without_null"))
    return {
        "fields": len(schema.fields),
        "slots": monkey.batch_size,
        "answer_tokens_per_field": lengths,
        "one_question_answer_tokens": answer_tokens,
        "one_question_ms": one,
        "ten_fields_ms": ten,
        "ten_fields_without_null_scoring_ms": ten_without_null,
        "ratio": ten / one,
        "ratio_without_null_scoring": ten_without_null / one,
        "goal_met": ten / one < 2,
        "runs_ms": times,
        "ten_fields_scheduler": work,  # one 10-field page: passes, steps, tokens
    }


def decode_section(monkey: Any, page: Any, tokens: int, rounds: int = 3) -> dict[str, Any]:
    from monkey_cli import tasks
    from monkey_cli.engine import GenerationRequest, SamplingParams
    from monkey_cli.extract import coerce_schema
    from monkey_cli.extract.constraint import CompiledGrammar, llguidance_tokenizer
    from monkey_cli.extract.grammar import answer_grammar

    scheduler = monkey.scheduler()
    slots = scheduler.slots
    device = model_bench.model_device(monkey)
    llg = llguidance_tokenizer(monkey.tokenizer, monkey.model.config.vocab_size)
    # Long enough that no 32 tokens of the real vocabulary (up to 128 bytes each) fill it: the end stays optional.
    long_text = {"type": "string", "maxLength": 128 * tokens, "description": "What does the note say?"}
    text = coerce_schema({"type": "object", "properties": {"note": long_text}}).fields[0]
    text_grammar = CompiledGrammar.from_lark(answer_grammar(text, tokens).lark, llg)
    number = coerce_schema(TEN_FIELDS).fields[4]
    number_grammar = CompiledGrammar.from_lark(answer_grammar(number, 64).lark, llg)
    prompt = monkey.check_prompt(tasks.vqa_prompt(text.question), tokens)
    features = monkey.encode_images([page.image])[0]

    def median_step(make_constraint: Callable[[], Any] | None, count: int, forced: bool) -> float:
        params = SamplingParams(max_new_tokens=count, min_new_tokens=count if forced else 1)

        def requests() -> list[Any]:
            return [GenerationRequest(prompt, image_embeds=features, params=params,
                                      constraint=None if make_constraint is None else make_constraint())
                    for _ in range(slots)]

        scheduler.run(requests())  # warm-up
        handles = [scheduler.submit(request) for request in requests()]
        scheduler.step()  # admission
        steps = []
        while not all(handle.done() for handle in handles):
            started = time.perf_counter()
            scheduler.step()
            model_bench.synchronize(device)
            steps.append((time.perf_counter() - started) * 1000)
        return statistics.median(steps) if steps else float("nan")

    runs: dict[str, list[float]] = {"free": [], "text": [], "free_12": [], "number": []}
    for _ in range(rounds):  # interleaved, so that a change in the machine's load hits every variant alike
        runs["free"].append(median_step(None, tokens, forced=True))
        runs["text"].append(median_step(text_grammar.constraint, tokens, forced=True))
        runs["free_12"].append(median_step(None, 12, forced=True))
        runs["number"].append(median_step(number_grammar.constraint, 12, forced=False))
    return {
        "slots": slots,
        "tokens": tokens,
        "rounds": rounds,
        "free_ms_per_step": statistics.median(runs["free"]),
        "text_constrained_ms_per_step": statistics.median(runs["text"]),
        "free_ms_per_step_12": statistics.median(runs["free_12"]),
        "number_constrained_ms_per_step": statistics.median(runs["number"]),
        "runs": runs,
    }


# ----------------------------------------------------------------------------------------------------
def print_report(report: dict[str, Any]) -> None:
    if "vocabulary" in report:
        vocab = report["vocabulary"]
        print(f"\nvocabulary: {vocab['vocab']:,} logits; llguidance tokenizer built in "
              f"{vocab['tokenizer_build_s']:.2f} s")
        print(f"{'field':<10} {'kind':<8} {'compile ms':>10} {'mask ms (median)':>17} {'mask ms (max)':>14}")
        for name, row in vocab["kinds"].items():
            print(f"{name:<10} {row['kind']:<8} {row['compile_ms']:>10.2f} {row['mask_ms_median']:>17.3f} "
                  f"{row['mask_ms_max']:>14.3f}")
    if "page" in report:
        page = report["page"]
        print(f"\npage ({page['slots']} slots): one question ({page['one_question_answer_tokens']} tokens) "
              f"{page['one_question_ms']:.0f} ms; {page['fields']} fields {page['ten_fields_ms']:.0f} ms "
              f"({page['ratio']:.2f}x), without not-found scoring {page['ten_fields_without_null_scoring_ms']:.0f} "
              f"ms ({page['ratio_without_null_scoring']:.2f}x); goal < 2x: {'met' if page['goal_met'] else 'NOT met'}")
        print(f"answer tokens per field (with <|endoftext|>): {page['answer_tokens_per_field']}")
        print(f"one 10-field page in the scheduler: {page['ten_fields_scheduler']}")
    if "decode" in report:
        decode = report["decode"]
        print(f"\ndecode, {decode['slots']} busy slots: free {decode['free_ms_per_step']:.1f} ms/step, free text "
              f"constrained {decode['text_constrained_ms_per_step']:.1f} ms/step ({decode['tokens']} tokens); free "
              f"{decode['free_ms_per_step_12']:.1f}, number constrained "
              f"{decode['number_constrained_ms_per_step']:.1f} ms/step (12 tokens)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a checkpoint folder (default: a random-weight one, see above)")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER, help="qwen.tiktoken for the checkpoint")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--slots", type=int, default=4, help="decode slots (--batch-size)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per page figure (median)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per timed decode run")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated, of {', '.join(SECTIONS)} (default: all)")
    args = parser.parse_args(argv)
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    if not sections or set(sections) - set(SECTIONS):
        parser.error(f"--sections: choose among {', '.join(SECTIONS)}, got {args.sections!r}")

    import torch

    from monkey_cli import Monkey

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.model
        if folder is None:
            if not args.tokenizer.is_file():
                parser.error(f"--tokenizer {args.tokenizer}: not found (the real qwen.tiktoken is needed)")
            print("writing a random-weight checkpoint ...", file=sys.stderr, flush=True)
            folder = write_checkpoint(Path(scratch) / "checkpoint", device, args.tokenizer)
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
        monkey = Monkey.load(folder, device=device, dtype=dtype, quant="none", batch_size=args.slots)
        pages = model_bench.synthetic_pages(max(args.repeats, 2))
        from monkey_cli.documents import Page

        pages = [Page(source=f"page{i}", page=1, pages=1, image=image, kind="image", original_size=image.size)
                 for i, image in enumerate(pages)]
        report = {
            "machine": model_bench.machine_info(device),
            "checkpoint": str(args.model or "random weights"),
            "layers": monkey.model.config.num_hidden_layers,
            "hidden": monkey.model.config.hidden_size,
        }
        for name, section in (("vocabulary", lambda: vocabulary_section(monkey)),
                              ("page", lambda: page_section(monkey, pages, args.repeats)),
                              ("decode", lambda: decode_section(monkey, pages[0], args.tokens))):
            if name not in sections:
                continue
            print(f"measuring: {name} ...", file=sys.stderr, flush=True)
            report[name] = section()
            print(json.dumps(report[name]), file=sys.stderr, flush=True)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
