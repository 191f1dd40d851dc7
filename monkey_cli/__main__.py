"""`python -m monkey_cli` runs the command-line tool."""

from monkey_cli.cli import main

main()
