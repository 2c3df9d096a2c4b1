"""`python -m lit_ft ...` is the `lit-ft` command."""

from lit_ft.cli import main

main()
