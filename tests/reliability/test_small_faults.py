"""Four small faults (issue 26): names holding Markdown or HTML in a model card, a numeric environment
variable of launch.sh that is not a number, a run-folder lock left by a run on another host, and
SIGTERM to a comparison.

Real files and real commands in subprocesses: the card is written by `write_card` into a run folder
whose name is hostile, launch.sh runs with the bad variable, the lock file holds another host's
record, and the comparison is a real `python -m vitmpp.experiments.compare` whose cells are a small
script (no training: the signal is what is tested).
"""

from __future__ import annotations

import ast
import json
import os
import signal
import socket
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
import yaml

from engine_helpers import ROOT, printed_lines, run, start, wait_for

# ----------------------------------------------------------------------------- model card

HOSTILE_RUN = "r|`x`\n<script>alert(1)"  # a run.name: a folder name may hold all of these (not '/')
HOSTILE_DATA = "digits</td>|<script>alert(2)</script>\n```\nimport os"
HOSTILE_SPLIT = "tr|ain<b>"


class _Html(HTMLParser):
    """The tags and cell counts of rendered HTML, and the text of its first h1."""

    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.rows: list[int] = []
        self.h1 = ""
        self._in_h1 = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "tr":
            self.rows.append(0)
        elif tag in ("td", "th"):
            self.rows[-1] += 1
        self._in_h1 = tag == "h1" and not self.h1

    def handle_endtag(self, tag):
        if tag == "h1":
            self._in_h1 = False

    def handle_data(self, data):
        if self._in_h1:
            self.h1 += data


@pytest.mark.fault("run, data set and split names holding Markdown or HTML in the model card", expect="survived")
def test_names_holding_markdown_or_html_stay_names_in_the_card(tmp_path):
    import markdown_it  # (the dev extra)
    from vitmpp.models import create_encoder, save_encoder
    from vitmpp.models.hub import record_evaluation, write_card

    folder = tmp_path / "runs" / HOSTILE_RUN
    data = {
        "shards": "/data/a|b",
        "name": HOSTILE_DATA,
        "source": "/data/<i>_info.json",
        "num_classes": 10,
        "image_size": 16,
        "train_split": HOSTILE_SPLIT,
        "splits": {HOSTILE_SPLIT: 1079, "test": 359},
    }
    torch.manual_seed(0)
    save_encoder(
        create_encoder("vit_pico_patch4_16"),
        folder,
        objective="mpp",
        step=40,
        extra={"data": data, "shards": data["shards"], "train": {"global_batch": 32}},
    )
    # valid YAML with a line that would close a ``` block, then raw HTML
    (folder / "config.yaml").write_text(
        f"note: |\n  ```\n  <script>alert(3)</script>\nrun:\n  name: {json.dumps(HOSTILE_RUN)}\n"
    )
    record_evaluation(
        folder,
        {
            "run": f"/runs/{HOSTILE_RUN}",
            "protocol": "linear",
            "top1": 50.0,
            "top5": 90.0,
            "label_fraction": 1.0,
            "seed": 0,
            "split": HOSTILE_SPLIT,
        },
    )
    text = write_card(folder)[0].read_text()

    # the front matter holds the names as they are
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["datasets"] == [HOSTILE_DATA] and meta["model-index"][0]["name"] == HOSTILE_RUN

    md = markdown_it.MarkdownIt("commonmark").enable("table")
    page = _Html()
    page.feed(md.render(body))
    assert "script" not in page.tags and "b" not in page.tags and "i" not in page.tags  # no raw HTML kept
    assert page.h1 == f"{' '.join(HOSTILE_RUN.split())}: a ViT encoder pretrained with masked patch prediction"
    assert page.rows and all(n in (2, 3, 9) for n in page.rows), (
        page.rows
    )  # the encoder, splits, training, results tables
    fences = [t for t in md.parse(body) if t.type == "fence"]
    assert [t.info for t in fences] == ["python", "yaml"]  # no name opened or closed a block
    assert yaml.safe_load(fences[1].content) == yaml.safe_load((folder / "config.yaml").read_text())
    scope: dict = {}
    exec(compile(ast.parse(fences[0].content), "card", "exec"), scope)  # the timm snippet runs as printed
    assert scope["features"].shape == (1, 17, 64)


# ----------------------------------------------------------------------------- launch.sh's numbers

BAD_NUMBERS = [("VITMPP_NUM_PROCESSES", v) for v in ("abc", "0", "-1", "1.5", "", "08")] + [
    ("VITMPP_GPUS_PER_NODE", "-1"),
    ("SLURM_NNODES", "two"),
    ("SLURM_NODEID", "x"),
    ("MASTER_PORT", "70000"),
    ("MASTER_PORT", "port"),
]


@pytest.mark.fault(
    "a numeric environment variable of launch.sh that is not a whole number in range", expect="clear error"
)
@pytest.mark.parametrize("name,value", BAD_NUMBERS, ids=[f"{n}={v!r}" for n, v in BAD_NUMBERS])
def test_a_bad_number_in_launch_sh_s_environment_is_one_sentence_and_exit_2(name, value):
    variables = {"PATH": "/usr/bin:/bin", "VITMPP_GPUS_PER_NODE": "0", name: value}
    result = subprocess.run(
        [str(ROOT / "launch.sh"), "--dry-run", "pretrain"], capture_output=True, text=True, env=variables, timeout=60
    )
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""  # no command was printed: nothing would have run
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {name}='{value}' must be ") and line.endswith("unset it for the default."), line


@pytest.mark.fault("several SLURM nodes without SLURM_JOB_NODELIST", expect="clear error")
def test_several_nodes_without_a_node_list_is_one_sentence_and_exit_2():
    result = subprocess.run(
        [str(ROOT / "launch.sh"), "--dry-run", "pretrain"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "VITMPP_GPUS_PER_NODE": "0", "SLURM_NNODES": "2"},
        timeout=60,
    )
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: 2 nodes need SLURM_JOB_NODELIST"), line


# ----------------------------------------------------------------------------- comparisons


def compare_setup(tmp_path: Path, cell_script: str, seeds: str = "[0]") -> list[str]:
    """A comparison of one encoder (never read: the cells are `cell_script`) and its command line."""
    encoder = tmp_path / "encoder"
    encoder.mkdir()
    (encoder / "encoder.safetensors").write_bytes(b"")
    config = tmp_path / "compare.yaml"
    config.write_text(
        f"encoders: {{mpp: {encoder}}}\nprotocols: [knn]\nlabel_fractions: [1.0]\nseeds: {seeds}\n"
        f"recipes: {{knn: {ROOT / 'configs/finetune/knn_digits.yaml'}}}\noutput_dir: {tmp_path / 'out'}\n"
        f"launcher: {json.dumps(f'{sys.executable} {cell_script}')}\n"
    )
    return [sys.executable, "-m", "vitmpp.experiments.compare", "--config", str(config)]


def failing_cell() -> str:
    """A cell script that fails at once (exit 1)."""
    return "-c 'raise SystemExit(1)'"


@pytest.mark.fault("a run-folder lock whose record names a run on another host (no 'ended' mark)", expect="clear error")
def test_a_lock_of_another_host_is_refused_until_the_user_says_that_run_stopped(tmp_path):
    compare = compare_setup(tmp_path, failing_cell())
    out = tmp_path / "out"
    out.mkdir()
    record = (
        json.dumps(
            {"host": "node-elsewhere", "pid": 4242, "started": "2026-12-01 10:00:00 UTC", "command": "pretrain/main.py"}
        )
        + "\n"
    )
    (out / "lock").write_text(record)

    refused = run(compare, cwd=tmp_path, check=False)
    assert refused.returncode == 2
    (line,) = printed_lines(refused.stderr)
    assert line.startswith(f"error: Run folder '{out}' is locked by process 4242 on host node-elsewhere"), line
    assert f"this host ({socket.gethostname()}) cannot tell whether that process is still running" in line
    assert "make sure that run has stopped, then rerun with VITMPP_TAKE_OVER_LOCK=node-elsewhere:4242" in line
    assert (out / "lock").read_text() == record and sorted(p.name for p in out.iterdir()) == ["lock"]

    # another holder named: still refused
    assert run(compare, cwd=tmp_path, check=False, VITMPP_TAKE_OVER_LOCK="node-elsewhere:4243").returncode == 2
    assert (out / "lock").read_text() == record

    # the way through the message names: the run goes on (its one cell, `false`, then fails)
    taken = run(compare, cwd=tmp_path, check=False, VITMPP_TAKE_OVER_LOCK="node-elsewhere:4242")
    assert (
        "warning: run folder" in taken.stderr
        and "process 4242 on host node-elsewhere" in taken.stderr
        and "which VITMPP_TAKE_OVER_LOCK says has stopped; taken over" in taken.stderr
    ), taken.stderr
    assert "Cell mpp-knn-f1-s0 failed" in taken.stderr
    holder = json.loads((out / "lock").read_text())
    assert holder["host"] == socket.gethostname() and "ended" in holder


@pytest.mark.fault("a run-folder lock whose record names a dead run on this host", expect="survived")
def test_a_lock_of_a_dead_run_on_this_host_is_still_taken_over(tmp_path):
    compare = compare_setup(tmp_path, failing_cell())
    out = tmp_path / "out"
    out.mkdir()
    (out / "lock").write_text(json.dumps({"host": socket.gethostname(), "pid": 4242, "started": "then"}) + "\n")
    taken = run(compare, cwd=tmp_path, check=False)
    assert f"locked by process 4242 on host {socket.gethostname()}" in taken.stderr
    assert "which died holding it; taken over" in taken.stderr and "Cell mpp-knn-f1-s0 failed" in taken.stderr


CELL = """import json, os, pathlib, sys, time
args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a and not a.startswith("-"))
here = pathlib.Path({here!r})
with open(here / "calls.log", "a") as log:
    log.write(args["run.name"] + "\\n")
folder = pathlib.Path(args["run.output_dir"]) / args["run.name"]
folder.mkdir(parents=True, exist_ok=True)
if args["train.seed"] == "0":
    results = {{"encoder": args["encoder"] + "/encoder.safetensors", "test_last_top1": 50.0}}
    (folder / "results.json").write_text(json.dumps(results))
elif (here / "fail-now").exists():
    sys.exit(1)
else:
    (here / "sleeping").write_text(str(os.getpid()))
    time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.fault("SIGTERM to compare while a cell runs", expect="survived")
def test_sigterm_to_compare_says_what_is_kept_and_exits_0(tmp_path):
    """Seed 0's cell finishes, seed 1's sleeps; SIGTERM to the compare process alone: the sleeping cell is
    passed the signal, one line says 1 of 2 cells is kept, exit 0; the same command continues with seed 1."""
    script = tmp_path / "cell.py"
    script.write_text(CELL.format(here=str(tmp_path)))
    compare = compare_setup(tmp_path, str(script), seeds="[0, 1]")
    cells = tmp_path / "out" / "cells"
    proc = start(compare, cwd=tmp_path)
    sleeper = None
    try:
        wait_for(lambda: (tmp_path / "sleeping").is_file() and (tmp_path / "sleeping").read_text(), 120, proc)
        sleeper = int((tmp_path / "sleeping").read_text())
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
        left_behind = alive(sleeper)  # the running cell is stopped with it (compare waits for it), not orphaned
    finally:
        if proc.poll() is None:
            proc.kill()
        if sleeper is not None and alive(sleeper):
            os.kill(sleeper, signal.SIGKILL)  # (an orphaned cell would hold the pipes open)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and not left_behind, err
    assert printed_lines(err) == [
        f"[compare] stopped by SIGTERM: 1 of 2 cells finished and are kept in {cells}; "
        "run the same command again to continue (finished cells are not run again)"
    ], err
    kept = (cells / "mpp-knn-f1-s0" / "results.json").read_bytes()
    assert json.loads((tmp_path / "out" / "lock").read_text()).get("ended")

    (tmp_path / "fail-now").write_text("")  # seed 1's cell now fails at once: the rerun ends there
    again = run(compare, cwd=tmp_path, check=False)
    assert again.returncode == 2 and "Cell mpp-knn-f1-s1 failed" in again.stderr
    calls = (tmp_path / "calls.log").read_text().split()
    assert calls == ["mpp-knn-f1-s0", "mpp-knn-f1-s1", "mpp-knn-f1-s1"]  # seed 0 was not run again
    assert (cells / "mpp-knn-f1-s0" / "results.json").read_bytes() == kept
