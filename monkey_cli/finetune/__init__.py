"""Fine-tuning Monkey on your own documents: LoRA / QLoRA in the original's data format.

* `data.py`: the data file (a JSON list or JSON lines of conversations), checked and tokenized;
* `collator.py`: batches (right padding, answer-only labels, stacked pixels);
* `trainer.py`: the run, on the transformers Trainer (imports torch and transformers);
* `adapters.py`: LoRA layers, applying an adapter to a loaded model, merging, the adapter's hash.

Importing this package is cheap; `monkey_cli.finetune.trainer` is the heavy part.
"""
