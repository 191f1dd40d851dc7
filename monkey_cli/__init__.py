"""monkey-cli: document understanding with the Monkey multimodal model.

The public API is imported lazily so that `monkey --help` does not pay for torch:
`from monkey_cli import Monkey` loads the model code on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "Monkey": "monkey_cli.api",
    "MonkeyConfig": "monkey_cli.model.configuration",
    "QWenTokenizer": "monkey_cli.model.tokenizer",
    "load_documents": "monkey_cli.documents",
}

if TYPE_CHECKING:  # pragma: no cover
    from monkey_cli.api import Monkey
    from monkey_cli.documents import load_documents
    from monkey_cli.model.configuration import MonkeyConfig
    from monkey_cli.model.tokenizer import QWenTokenizer

__all__ = ["Monkey", "MonkeyConfig", "QWenTokenizer", "load_documents", "__version__"]


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'monkey_cli' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module_name), name)
