"""`python -m monkey_cli` and the `monkey` command.

Signal handling is set up before anything else is imported, so Ctrl-C (or SIGTERM, SIGHUP) at any moment,
imports included, ends with exit status 128 + signal and no traceback.
"""

from __future__ import annotations

import signal

# Held back from the very first statement until `signals.install()` has set the handlers (which lets them in):
# a signal that comes while Python imports what follows is then handled like any other, never with a traceback.
if hasattr(signal, "pthread_sigmask"):
    signal.pthread_sigmask(signal.SIG_BLOCK, {getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")})

from monkey_cli import signals  # noqa: E402  (after the mask above, on purpose)


def main() -> None:
    try:
        signals.install()  # a signal held back by the mask arrives here, as an Interrupted
        from monkey_cli.cli import main as run
    except KeyboardInterrupt:
        raise SystemExit(signals.exit_code()) from None
    run()


if __name__ == "__main__":
    main()
