"""W&B sweep files: the agent's own command renderer must produce a train.py call that runs."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml
from wandb import wandb_agent

from tests.helpers import QUICK, REPO, run_train

SWEEPS = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))


def first_value(spec: dict):
    """The value an agent could propose first for one parameter spec."""
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return spec["values"][0]
    return spec["min"]


def render_agent_command(sweep: dict, args: dict, monkeypatch, tmp_path: Path) -> list[str]:
    """The argv a `wandb agent` would start for one proposed run, rendered by wandb's own agent."""
    started: list[list[str]] = []

    class RecordingProcess:
        def __init__(self, command=None, **kwargs):
            started.append(command)

    monkeypatch.setattr(wandb_agent, "AgentProcess", RecordingProcess)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SWEEP_ID", "test-sweep")
    # The agent exports the run's id and parameter file to its children through os.environ;
    # registering them with monkeypatch removes them again after the test.
    monkeypatch.setenv(wandb_agent.wandb.env.RUN_ID, "")
    monkeypatch.setenv(wandb_agent.wandb.env.SWEEP_PARAM_PATH, "")
    agent = wandb_agent.Agent.__new__(wandb_agent.Agent)
    agent._sweep_command = list(sweep["command"])
    agent._function = None
    agent._in_jupyter = False
    agent._forward_signals = False
    agent._run_processes = {}
    agent._command_run({
        "run_id": "run0",
        "program": sweep["program"],
        "args": {key: {"value": value} for key, value in args.items()},
    })
    return started[0]


@pytest.mark.parametrize("sweep_file", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_sweep_file_is_well_formed(sweep_file):
    sweep = yaml.safe_load(sweep_file.read_text())
    assert sweep["program"] == "train.py"
    assert "${args_no_hyphens}" in sweep["command"]
    namespace, *rest = sweep["metric"]["name"].split("/")
    assert namespace in ("train", "val", "test") and rest and all(rest)


@pytest.mark.parametrize("sweep_file", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_agent_command_runs_and_logs_the_sweep_metric(sweep_file, monkeypatch, tmp_path, demo_root, request):
    sweep = yaml.safe_load(sweep_file.read_text())
    proposal = {name: first_value(spec) for name, spec in sweep["parameters"].items()}
    command = render_agent_command(sweep, proposal, monkeypatch, tmp_path)
    assert command[:3] == ["/usr/bin/env", "python", "train.py"]
    assert [f"{k}={v}" for k, v in proposal.items()] == command[-len(proposal):]
    experiment = next(a.split("=", 1)[1] for a in command if a.startswith("experiment="))
    run_dir = tmp_path / "run"
    inputs = [f"datamodule.codes={request.getfixturevalue('code_cache')}"] if experiment == "prior" else []
    run_train([*command[3:], *QUICK.get(experiment, []), *inputs, "logger=csv", "trainer.accelerator=cpu",
               "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
               f"run_dir={run_dir}", f"paths.demo={demo_root}"])
    with open(run_dir / "csv" / "metrics.csv") as handle:
        logged = next(csv.reader(handle))
    assert sweep["metric"]["name"] in logged, logged
