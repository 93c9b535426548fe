"""Worker output through the launcher (issue 20, item 8): memory stays bounded whatever a worker
prints, and carriage-return progress bars (tqdm) pass through as they are drawn."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

from conftest import REPO

from phalanx.launch.procs import MAX_LINE, _emit

ENV = {**os.environ, "PYTHONPATH": str(REPO / "src")}


def pieces(data: bytes) -> tuple[list[bytes], bytes]:
    out: list[bytes] = []
    rest = _emit(data, out.append, lambda: b"[rank0]: ")
    return out, rest


def test_pieces_end_at_newlines_and_carriage_returns() -> None:
    out, rest = pieces(b"a\nb\r\nc\r 10%\r 20%\rtail")
    assert out == [b"[rank0]: a\n", b"[rank0]: b\n", b"[rank0]: c\r", b"[rank0]:  10%\r",
                   b"[rank0]:  20%\r"]
    assert rest == b"tail"
    # A '\r' at the very end may be the start of '\r\n': it waits for the next byte.
    assert pieces(b"x\r") == ([], b"x\r")
    assert pieces(b"\r 5%") == ([], b" 5%")  # a bare '\r' before the first draw says nothing


def test_a_long_line_is_split_into_bounded_pieces() -> None:
    out, rest = pieces(b"x" * (2 * MAX_LINE + 7))
    assert [len(p) for p in out] == [len(b"[rank0]: ") + MAX_LINE + 1] * 2
    assert rest == b"x" * 7


def run_launcher(tmp_path, script: str, timeout: float = 60) -> tuple[int, bytes, int]:
    """Run a 1-worker job under a parent that reports its children's peak RSS (KiB); the
    worker's own is small, so the peak is the launcher's."""
    (tmp_path / "job.py").write_text(textwrap.dedent(script))
    parent = textwrap.dedent(f"""
        import resource, subprocess, sys
        with open({str(tmp_path / 'out.bin')!r}, 'wb') as out:
            rc = subprocess.call([sys.executable, '-m', 'phalanx.launch.cli', 'run', '-np', '1',
                                  {str(tmp_path / 'job.py')!r}], stdout=out)
        print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    """)
    res = subprocess.run([sys.executable, "-c", parent], env=ENV, capture_output=True,
                         timeout=timeout, cwd=tmp_path)
    rc, peak_kib = map(int, res.stdout.split())
    return rc, (tmp_path / "out.bin").read_bytes(), peak_kib


def test_a_100_mb_line_without_newline_keeps_the_launcher_small(tmp_path) -> None:
    script = """
    import sys
    chunk = b"y" * (1 << 20)
    for _ in range(100):
        sys.stdout.buffer.write(chunk)
    sys.stdout.buffer.flush()
    """
    rc, out, peak_kib = run_launcher(tmp_path, script)
    assert rc == 0
    assert out.count(b"y") == 100 << 20  # nothing lost
    assert max(len(line) for line in out.split(b"\n")) <= MAX_LINE + len(b"[rank0]: ")
    # Before: the launcher held the whole line twice (230 MB). Now it holds a piece or two.
    assert peak_kib < 100 * 1024, f"launcher peaked at {peak_kib / 1024:.0f} MiB"


def test_carriage_return_updates_arrive_before_any_newline(tmp_path) -> None:
    go = tmp_path / "go"
    (tmp_path / "job.py").write_text(textwrap.dedent(f"""
        import os, sys, time
        sys.stdout.write("\\r  10%|#   |"); sys.stdout.flush()
        sys.stdout.write("\\r  20%|##  |"); sys.stdout.flush()
        deadline = time.monotonic() + 30
        while not os.path.exists({str(go)!r}) and time.monotonic() < deadline:
            time.sleep(0.05)
        print("\\ndone")
    """))
    proc = subprocess.Popen([sys.executable, "-m", "phalanx.launch.cli", "run", "-np", "1",
                             str(tmp_path / "job.py")], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        seen, deadline = b"", time.monotonic() + 30
        os.set_blocking(proc.stdout.fileno(), False)
        while b"[rank0]:   10%|#   |\r" not in seen and time.monotonic() < deadline:
            seen += proc.stdout.read() or b""
            time.sleep(0.05)
        assert b"[rank0]:   10%|#   |\r" in seen, seen  # the worker has printed no newline yet
        go.touch()
        os.set_blocking(proc.stdout.fileno(), True)
        rest, _ = proc.communicate(timeout=30)
        assert b"[rank0]:   20%|##  |\n" in seen + rest and b"[rank0]: done\n" in seen + rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
