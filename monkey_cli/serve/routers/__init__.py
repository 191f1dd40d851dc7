"""One router per concern: chat (OpenAI's chat completions), documents (the CLI's records), models, health,
and web (the page)."""
