"""The CLI under real-world conditions: Ctrl-C exits 130, progress in a log file stays plain,
and two runs cannot write one output folder at once."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.test_cli_pipeline import write_spec


def test_ctrl_c_during_a_search_exits_130(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "long.yaml", search={"iterations": 100000})
    out = tmp_path / "out"
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from verifier.cli import main; main()",
            "lid",
            str(spec),
            "-o",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as from a terminal: a test run started in the background by a non-interactive shell
        # inherits SIGINT ignored, and would pass that on
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 120
        seen = ""
        assert process.stderr is not None
        while "searching" not in seen and time.monotonic() < deadline:
            seen += process.stderr.read(1)
        time.sleep(1.0)  # well inside the 100,000-iteration search
        process.send_signal(signal.SIGINT)
        _, rest = process.communicate(timeout=60)
    finally:
        if process.poll() is None:  # never leave the search running
            process.kill()
            process.communicate()
    assert process.returncode == 130, seen + rest
    last = [line for line in rest.splitlines() if line.strip()][-1]
    assert last.startswith("interrupted:"), rest
    assert "Traceback" not in rest
    assert not (out / "certificate.json").exists()


def test_progress_on_a_log_file_is_plain_lines_without_carriage_returns(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "spec.yaml", search={"iterations": 40})
    log = tmp_path / "run.log"
    with log.open("w", encoding="utf-8") as handle:
        done = subprocess.run(
            [sys.executable, "-c", "from verifier.cli import main; main()", "lid", str(spec)]
            + ["-o", str(tmp_path / "out")],
            stdout=subprocess.DEVNULL,
            stderr=handle,
            timeout=300,
        )
    assert done.returncode == 0
    text = log.read_text(encoding="utf-8")
    assert "\r" not in text
    progress = [line for line in text.splitlines() if line.startswith("LID search:")]
    assert progress and progress[-1].startswith("LID search: 40/40 it"), text
    assert len(progress) <= 3, text


def test_a_second_run_on_a_locked_output_folder_exits_2(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from verifier.cli import ExitCode, cli
    from verifier.files import folder_lock

    spec = write_spec(tmp_path, "spec.yaml", search={"iterations": 5})
    out = tmp_path / "out"
    with folder_lock(out):  # as a first run writing the folder would hold it
        result = CliRunner().invoke(cli, ["lid", str(spec), "-o", str(out)])
    assert result.exit_code == ExitCode.BAD_INPUT, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "another run is writing this output folder" in lines[0]
    assert not (out / "lid.safetensors").exists()
    after = CliRunner().invoke(cli, ["lid", str(spec), "-o", str(out)])
    assert after.exit_code == ExitCode.OK, after.output  # the lock goes with its holder


def test_a_reader_sees_the_old_lid_or_the_new_one_never_a_mix(tmp_path: Path) -> None:
    import threading

    import torch

    from verifier.domains import Box
    from verifier.domains.io import load_lid, save_lid

    gen = torch.Generator().manual_seed(0)
    centre = {"w": torch.randn(300, 50, generator=gen, dtype=torch.float64)}
    boxes = [Box.around(centre, radius=r) for r in (0.01, 0.02)]
    path = tmp_path / "lid.safetensors"
    save_lid(path, boxes[0], {"model_sha256": "0" * 64})
    stop = threading.Event()

    def rewrite() -> None:
        turn = 0
        while not stop.is_set():
            turn += 1
            save_lid(path, boxes[turn % 2], {"model_sha256": "0" * 64})

    writer = threading.Thread(target=rewrite)
    writer.start()
    seen = set()
    try:
        for reads in range(2000):
            if reads >= 200 and seen == {0, 1}:
                break
            upper = load_lid(path).box.upper["w"]
            matches = [i for i, b in enumerate(boxes) if torch.equal(upper, b.upper["w"])]
            assert len(matches) == 1, "a LID read while being rewritten matches neither version"
            seen.add(matches[0])
    finally:
        stop.set()
        writer.join()
    assert seen == {0, 1}  # both versions were read: the rewrites really overlapped the reads
