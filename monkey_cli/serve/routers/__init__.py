"""One router per concern: chat (OpenAI's chat completions), documents (the CLI's records), extract (`monkey
extract`'s record), models, health, and web (the page)."""
