"""The `verifier` command line: parse, call one library function, render, pick the exit code.

Exit codes: 0 success, 1 specification not met or verification failed, 2 bad input.
Results go to stdout (JSON with --json); messages and progress go to stderr.
Each command lives in a module of this package and is registered here.
"""

from __future__ import annotations

import click

from verifier.cli import crosscheck, embed, lid, model, report, update
from verifier.cli.conventions import BadInput, ExitCode

__all__ = ["BadInput", "ExitCode", "cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lid-verifier")
def cli() -> None:
    """Locally invariant domains: prove that updated weights still meet a specification."""


cli.add_command(model.inspect)
cli.add_command(lid.lid)
cli.add_command(lid.run)
cli.add_command(lid.certify)
cli.add_command(crosscheck.crosscheck)
cli.add_command(report.report)
cli.add_command(report.verify)
cli.add_command(update.project)
cli.add_command(embed.embed)


def main() -> None:
    """Console-script entry point."""
    cli()
