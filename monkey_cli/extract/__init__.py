"""`monkey extract`: fields out of documents as validated values, with the model's confidence.

    from monkey_cli import Monkey
    m = Monkey.load("echo840/Monkey-Chat")
    result = m.extract("invoice.pdf", {"type": "object", "properties": {"total": {"type": "number"}}})
    result.values["total"], result.fields["total"].confidence

Modules: `schema` (JSON Schema, fields files, --field, pydantic -> fields), `grammar` (a field's answers as a
grammar; answers -> values), `constraint` (grammars as the engine's token constraints, over llguidance),
`extractor` (pages -> requests -> one record per document), `results` (records, the multi-page rule, json /
jsonl / csv), `run` (the command's flow: inputs, --out, resume). Importing this package is cheap: torch and
llguidance load when a model is used.
"""

from __future__ import annotations

from monkey_cli.extract.extractor import ExtractOptions, Extractor, extract_pages
from monkey_cli.extract.grammar import NOT_FOUND
from monkey_cli.extract.results import Candidate, Extraction, FieldResult
from monkey_cli.extract.schema import (
    ExtractSchema,
    Field,
    SchemaError,
    coerce_schema,
    from_json_schema,
    from_pydantic,
    from_short_forms,
    read_fields_file,
    read_schema_file,
)

__all__ = [
    "NOT_FOUND",
    "Candidate",
    "ExtractOptions",
    "ExtractSchema",
    "Extraction",
    "Extractor",
    "Field",
    "FieldResult",
    "SchemaError",
    "coerce_schema",
    "extract_pages",
    "from_json_schema",
    "from_pydantic",
    "from_short_forms",
    "read_fields_file",
    "read_schema_file",
]
