"""Host lists: -H and hostfile parsing and rank packing (pure), and their CLI errors; what
reaches ssh's command line (the host after `--`, never an option), the environment the
launcher forwards to other hosts' workers, and what the launcher says when a host is lost."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from conftest import REPO
from phalanx.launch import remote
from phalanx.launch.cli import _explicit_env, _run_parser
from phalanx.launch.hosts import (HostSlots, check_host, describe, parse_hostfile, parse_hosts,
                                  place, placement_line)
from phalanx.launch.report import Exit, exit_code

CLI = [sys.executable, "-m", "phalanx.launch.cli"]
ENV = {"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}


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


@pytest.mark.parametrize("name", ["node1", "node-1.example.com", "node1.", "10.0.0.7", "::1",
                                  "fe80::1%eth0", "root@node1", "_svc.x@10.0.0.7", "a" * 63])
def test_good_host_names(name) -> None:
    assert check_host(name) == name


@pytest.mark.parametrize("name,why", [
    ("-oProxyCommand=touch /tmp/x", "starts with '-', which ssh would read as an option"),
    ("-p22", "starts with '-'"),
    ("u@-oProxyCommand=x", "starts with '-'"),
    ("-u@node1", "its user '-u' is not a user name"),
    ("node_1", "its label 'node_1' is not"),
    ("-node1", "starts with '-'"),
    ("node1-", "its label 'node1-' is not"),
    ("a..b", "its label '' is not"),
    ("a" * 64, "is not 1-63"),
    ("node1 -oX", "its label 'node1 -oX' is not"),
    ("n;touch x", "is not 1-63"),
    ("fe80::zz", "holds ':' but is not an IPv6 address"),
])
def test_bad_host_names_say_which_and_why(name, why) -> None:
    with pytest.raises(ValueError) as e:
        check_host(name, "-H")
    msg = str(e.value)
    assert msg.startswith(f"-H: host {name!r} is not valid: ") and why in msg, msg
    assert "give a DNS name" in msg  # and what to give instead


def test_ipv6_hosts_take_brackets_with_slots() -> None:
    assert parse_hosts("[fe80::1]:4,[::2],u@[::3]:2") == [("fe80::1", 4), ("::2", 1),
                                                         ("u@::3", 2)]
    assert parse_hostfile("fe80::1 slots=2\n[::2] slots=1\n") == [("fe80::1", 2), ("::2", 1)]
    with pytest.raises(ValueError, match=r"write it in brackets, \[fe80::1:4\]"):
        parse_hosts("fe80::1:4")
    with pytest.raises(ValueError, match="hf:1: host '-oProxyCommand=x' is not valid"):
        parse_hostfile("-oProxyCommand=x slots=1\n", "hf")


def test_ssh_reads_the_host_after_double_dash() -> None:
    argv = remote.ssh_argv("node1", ["python3", "-V"], None)
    assert argv[argv.index("--") + 1] == "node1" and argv.index("--") < len(argv) - 2
    with pytest.raises(ValueError, match="starts with '-'"):
        remote.ssh_argv("-oProxyCommand=touch x", ["true"], None)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["-H", "--hosts=", "--hostfile"])
def test_a_host_that_is_an_ssh_option_runs_nothing(tmp_path, how) -> None:
    """`-oProxyCommand=CMD` as a host would make ssh run CMD here: refused before any ssh."""
    marker = tmp_path / "ran"
    host = f"-oProxyCommand=touch${{IFS}}{marker}"  # no space: one word in a hostfile too
    (tmp_path / "x.py").write_text("print('hi')\n")
    if how == "--hostfile":
        (tmp_path / "hf").write_text(f"{host} slots=1\n")
        spec = ["--hostfile", str(tmp_path / "hf")]
    else:
        spec = [f"-H{host}"] if how == "-H" else [f"--hosts={host}"]
    res = subprocess.run([*CLI, "run", "--bind", "127.0.0.1", *spec, str(tmp_path / "x.py")],
                         capture_output=True, text=True, env=ENV, timeout=50, cwd=tmp_path)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert f"host {host!r} is not valid: it starts with '-'" in lines[0]
    assert not marker.exists(), "ssh ran the ProxyCommand"


def test_the_placement_line_says_which_ranks_run_where() -> None:
    hosts = place(parse_hosts("a:2,b:1,c:3"), 5)
    assert describe(hosts) == "a:2 (ranks 0-1), b:1 (rank 2), c:2 (ranks 3-4)"
    assert placement_line("the hosts of -H", hosts, "over ssh") == (
        "using the hosts of -H: 5 worker(s) on a:2 (ranks 0-1), b:1 (rank 2), c:2 (ranks 3-4), "
        "agents started over ssh")


def test_the_launchers_environment_is_forwarded_less_the_deny_list(monkeypatch) -> None:
    for name, value in {"EPOCHS": "2", "HOSTNAME": "launcher", "SSH_CONNECTION": "x",
                        "SLURM_JOB_ID": "7", "BASH_FUNC_f%%": "() { :; }", "HOME": "/h",
                        "PHALANX_SECRET": "s3cret", "PHALANX_ALLREDUCE": "gloo"}.items():
        monkeypatch.setenv(name, value)
    out = remote.remote_env({"EPOCHS": "3", "HOSTNAME": "forced"})
    assert out["EPOCHS"] == "3" and out["HOSTNAME"] == "forced"  # -x wins, even denied ones
    assert out["PHALANX_ALLREDUCE"] == "gloo" and out["PATH"] == os.environ["PATH"]
    for name in ("SSH_CONNECTION", "SLURM_JOB_ID", "BASH_FUNC_f%%", "HOME", "PHALANX_SECRET"):
        assert name not in out, name
    with pytest.raises(Exception, match="PHALANX_SECRET"):
        remote.remote_env({"PHALANX_SECRET": "x"})


def test_x_flags_set_or_forward_a_variable(monkeypatch, capsys) -> None:
    monkeypatch.setenv("SSH_AUTH_SOCK", "/run/agent")
    p = _run_parser()
    assert _explicit_env(["EPOCHS=2", "SSH_AUTH_SOCK", "EMPTY="], p) == {
        "EPOCHS": "2", "SSH_AUTH_SOCK": "/run/agent", "EMPTY": ""}
    a = p.parse_args(["-x", "A=1", "--env", "B=2", "train.py", "-x", "C"])
    assert a.env == ["A=1", "B=2"] and a.args == ["-x", "C"]  # the script's own -x is its own
    monkeypatch.delenv("UNSET_HERE", raising=False)
    for spec, needle in [("UNSET_HERE", "-x UNSET_HERE: UNSET_HERE is not set here"),
                         ("1X=2", "'1X' is not a variable name"),
                         ("PHALANX_SECRET=x", "the job secret is made by the launcher")]:
        with pytest.raises(SystemExit):
            _explicit_env([spec], p)
        assert needle in capsys.readouterr().err


def test_the_agents_command_line_holds_no_environment_and_no_secret(monkeypatch) -> None:
    from phalanx.launch.supervisor import RunConfig
    monkeypatch.setenv("EPOCHS", "2")
    cfg = RunConfig(np=2, script="train.py", extra_env={"X": "1"})
    argv = remote.agent_argv(host=HostSlots(name="b", slots=2), address="10.0.0.1:5",
                             job_id="j", cfg=cfg)
    assert "--env" not in argv and "--env-stdin" in argv and "--secret-stdin" in argv
    assert not any("EPOCHS" in a or "X=1" in a for a in argv), argv


def test_the_agent_reads_its_workers_environment_after_the_secret(monkeypatch) -> None:
    from phalanx.launch import agent
    a = agent.parser().parse_args(["--coordinator", "h:1", "--job-id", "j", "--secret-stdin",
                                   "--env-stdin", "x.py"])
    monkeypatch.setattr(sys, "stdin", io.StringIO('s3cret\n{"EPOCHS": "2"}\nlifeline\n'))
    assert agent._read_secret(a) == "s3cret" and agent._read_env(a) == {"EPOCHS": "2"}
    for line, needle in [("EPOCHS=2", "is not JSON"), ('["EPOCHS"]', "one JSON object"),
                         ('{"1X": "2"}', "NAME: letters"), ('{"X": 2}', "NAME: VALUE strings"),
                         ('{"PHALANX_SECRET": "x"}', "may not carry PHALANX_SECRET")]:
        monkeypatch.setattr(sys, "stdin", io.StringIO(line + "\n"))
        with pytest.raises(ValueError, match=needle):
            agent._read_env(a)


def test_a_lost_host_is_a_fault_reported_with_its_agents_status() -> None:
    e = Exit(slot=2, worker="w2", pid=-1, code=255, seen=0.0, lost=True, host_lost=True,
             detail="host b lost: its ssh session exited with code 255")
    assert e.is_fault and exit_code(e) == 255
    assert e.why() == "rank 2 (worker w2): host b lost: its ssh session exited with code 255"


@pytest.mark.timeout(60)
def test_an_unreachable_host_fails_the_job_with_sshs_status(tmp_path) -> None:
    """ssh cannot connect (exit 255): the launcher names the placement first, then the lost
    host with ssh's status, and exits with it (not 137, as if something were SIGKILLed)."""
    (tmp_path / "x.py").write_text("print('hi')\n")
    (tmp_path / "ssh_config").write_text("Host *\n  Port 1\n  BatchMode yes\n  "
                                         "ConnectTimeout 5\n  StrictHostKeyChecking no\n")
    res = subprocess.run([*CLI, "run", "--bind", "127.0.0.1", "-H", "127.0.0.2:2",
                          "--ssh-config", str(tmp_path / "ssh_config"), str(tmp_path / "x.py")],
                         capture_output=True, text=True, env={**ENV, "HOME": str(tmp_path)},
                         timeout=50, cwd=tmp_path)
    assert res.returncode == 255, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("[phalanx]")]
    assert lines[0] == ("[phalanx] using the hosts of -H: 2 worker(s) on 127.0.0.2:2 "
                        "(ranks 0-1), agents started over ssh"), lines
    lost = ("host 127.0.0.2 lost: its ssh session exited with code 255 (ssh's status when the "
            "connection fails or drops)")
    assert lines[-1].startswith(f"[phalanx] job failed: rank 0 (worker w0): {lost}"), lines
    assert "pid -1" not in res.stderr
