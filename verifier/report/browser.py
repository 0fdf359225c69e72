"""Headless Chromium for the report: print-to-PDF and screenshots.

Chromium is found on PATH (`chromium`, `chromium-browser`, `google-chrome`) or named by the
environment variable LID_CHROMIUM. Every call starts a fresh headless browser with a new,
temporary profile (or the one given) and the flags below, and waits for it to exit. On Debian:
`apt-get install chromium`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from verifier.errors import BackendError

CHROMIUM_NAMES: Final = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
HEADLESS_FLAGS: Final = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
INSTALL_HINT: Final = (
    "install Chromium (Debian: `apt-get install chromium`) or set LID_CHROMIUM to its path"
)


def find_chromium() -> str | None:
    """The Chromium executable: $LID_CHROMIUM if set, else the first of CHROMIUM_NAMES on PATH."""
    named = os.environ.get("LID_CHROMIUM")
    if named:
        return shutil.which(named)
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found is not None:
            return found
    return None


def run_chromium(
    args: Sequence[str],
    *,
    profile_dir: Path | None = None,
    timeout_s: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium once with HEADLESS_FLAGS, a fresh profile and `args`.

    Args:
        args: further flags and the URL.
        profile_dir: the --user-data-dir to use (default: a new temporary folder).
        timeout_s: give up after this many seconds.

    Returns:
        The finished process (stdout and stderr captured as text).

    Raises:
        BackendError: Chromium is not installed, or it timed out.
    """
    executable = find_chromium()
    if executable is None:
        raise BackendError(f"headless Chromium is needed but was not found; {INSTALL_HINT}")
    with tempfile.TemporaryDirectory(prefix="lid-chromium-") as scratch:
        profile = profile_dir or Path(scratch)
        command = [executable, *HEADLESS_FLAGS, f"--user-data-dir={profile}", *args]
        try:
            return subprocess.run(
                command, capture_output=True, text=True, timeout=timeout_s, check=False
            )
        except subprocess.TimeoutExpired:
            raise BackendError(f"Chromium did not finish within {timeout_s:.0f} s") from None


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) with tmp = <a new folder beside path>/<path's name>, then rename it.

    Chromium picks the output format from the file's extension, so the temporary file keeps
    the real name inside a temporary folder of the same file system.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as scratch:
        target = Path(scratch) / path.name
        write(target)
        os.replace(target, path)


def _failure(process: subprocess.CompletedProcess[str], what: str) -> BackendError:
    lines = [ln for ln in process.stderr.splitlines() if "dbus" not in ln and ln.strip()]
    tail = lines[-1] if lines else "no message"
    return BackendError(f"Chromium could not {what} (exit {process.returncode}): {tail}")


def print_pdf(html_path: Path, pdf_path: Path, *, timeout_s: float = 120.0) -> None:
    """Print an HTML file to PDF with Chromium's print-to-PDF (no header or footer), atomically.

    Raises:
        BackendError: Chromium is missing, failed or wrote no PDF.
    """
    url = html_path.resolve().as_uri()

    def write(target: Path) -> None:
        process = run_chromium(
            [f"--print-to-pdf={target}", "--no-pdf-header-footer", url], timeout_s=timeout_s
        )
        if not target.is_file() or not target.read_bytes()[:5] == b"%PDF-":
            raise _failure(process, f"print {html_path} to PDF")

    _write_atomic(pdf_path, write)


def screenshot(
    html_path: Path,
    png_path: Path,
    *,
    width: int = 1200,
    height: int = 1600,
    profile_dir: Path | None = None,
    timeout_s: float = 120.0,
) -> list[str]:
    """Render an HTML file in headless Chromium and save the top width x height px as PNG.

    Args:
        html_path: the page.
        png_path: where the screenshot goes (written atomically).
        width: viewport width in px.
        height: viewport height in px.
        profile_dir: --user-data-dir (default: a new temporary folder).
        timeout_s: give up after this many seconds.

    Returns:
        The page's console messages (uncaught errors included), one string each.

    Raises:
        BackendError: Chromium is missing, failed or wrote no PNG.
    """
    url = html_path.resolve().as_uri()
    messages: list[str] = []

    def write(target: Path) -> None:
        process = run_chromium(
            [
                "--enable-logging=stderr",
                "--v=0",
                "--hide-scrollbars",
                f"--window-size={width},{height}",
                f"--screenshot={target}",
                url,
            ],
            profile_dir=profile_dir,
            timeout_s=timeout_s,
        )
        if not target.is_file() or target.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
            raise _failure(process, f"take a screenshot of {html_path}")
        messages.extend(console_messages(process.stderr))

    _write_atomic(png_path, write)
    return messages


def console_messages(stderr: str) -> list[str]:
    """The page console lines in Chromium's --enable-logging=stderr output.

    Chromium logs every console call and uncaught exception as `...:CONSOLE...] "text",
    source: URL (line)`, whatever its level; a report page has no script, so any is a fault.
    """
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]
