"""The `verifier` command line: parse, call one library function, render, pick the exit code.

Exit codes: 0 success, 1 specification not met or verification failed, 2 bad input, 130
interrupted (Ctrl-C).
Results go to stdout (JSON with --json); messages and progress go to stderr.
Each command lives in a module of this package and is registered here.
"""

from __future__ import annotations

import sys

import click

from verifier.cli import crosscheck, embed, lid, model, report, update
from verifier.cli.conventions import BadInput, ExitCode
from verifier.runtime import tune_allocator

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


INTERRUPTED = 130
"""Exit code of a run stopped by Ctrl-C (128 + SIGINT, as shells report it)."""


def main() -> None:
    """Console-script entry point: click's standalone handling, except that Ctrl-C exits 130
    (click's default, 1, would read as "specification not met")."""
    tune_allocator()
    try:
        code = cli.main(standalone_mode=False)
    except click.exceptions.Abort as err:
        if isinstance(err.__cause__, KeyboardInterrupt):
            click.echo(
                "interrupted: stopped before finishing (every output file is written whole "
                "or not at all)",
                err=True,
            )
            sys.exit(INTERRUPTED)
        click.echo("Aborted!", err=True)
        sys.exit(1)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
