"""Layer 9, the commands: `lit-ft` (`app`: LightningCLI's fit/validate/test/predict and the tools below), `export`
(adapter, merge, GGUF through `gguf`), `chat`, `plan` and `demo`. Nothing imports this layer but `lit_ft.__main__`
and the `lit-ft` entry point.

May import: everything.
"""


def main(argv=None):
    """The `lit-ft` command (its parser and LightningCLI load on call, so importing this package stays cheap)."""
    from lit_ft.cli.app import main as run

    return run(argv)
