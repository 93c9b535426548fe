"""Host lists: -H and hostfile parsing and rank packing (pure), and their CLI errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO
from phalanx.launch.hosts import HostSlots, parse_hostfile, parse_hosts, place


def test_parse_and_pack_host_by_host() -> None:
    assert parse_hosts("a:4,b:2, c") == [("a", 4), ("b", 2), ("c", 1)]
    text = "# cluster\na slots=4\nb:2   # comment\n\nc\n"
    assert parse_hostfile(text) == [("a", 4), ("b", 2), ("c", 1)]
    assert place([("a", 4), ("b", 4)], 6) == [HostSlots(name="a", slots=4, first_rank=0),
                                              HostSlots(name="b", slots=2, first_rank=4)]
    assert place([("a", 2), ("b", 2)], 2) == [HostSlots(name="a", slots=2, first_rank=0)]


@pytest.mark.parametrize("call,needle", [
    (lambda: parse_hosts("a:0"), "SLOTS >= 1"),
    (lambda: parse_hosts("a:2,a:2"), "listed twice"),
    (lambda: parse_hosts(" , "), "-H is empty"),
    (lambda: parse_hostfile("a slots=x\n", "hf"), "hf:1"),
    (lambda: parse_hostfile("# nothing\n", "hf"), "lists no hosts"),
    (lambda: place([("a", 2)], 3), "needs more slots than the hosts have (2)"),
])
def test_bad_host_lists_name_the_problem(call, needle) -> None:
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        call()


@pytest.mark.timeout(30)
def test_cli_refuses_bad_hosts_with_one_line(tmp_path) -> None:
    (tmp_path / "x.py").write_text("print('hi')\n")
    res = subprocess.run([sys.executable, "-m", "phalanx.launch.cli", "run", "-np", "5", "-H",
                          "localhost:2", str(tmp_path / "x.py")], capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"},
                         timeout=30)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "-np 5 needs more slots" in lines[0], res.stderr
