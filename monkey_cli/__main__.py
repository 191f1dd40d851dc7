"""`python -m monkey_cli` and the `monkey` command.

Signal handling is set up before anything else is imported, so Ctrl-C (or SIGTERM, SIGHUP) at any moment,
imports included, ends with exit status 128 + signal and no traceback.
"""

from __future__ import annotations

from monkey_cli import signals


def main() -> None:
    signals.install()
    try:
        from monkey_cli.cli import main as run
    except KeyboardInterrupt:
        raise SystemExit(signals.exit_code()) from None
    run()


if __name__ == "__main__":
    main()
