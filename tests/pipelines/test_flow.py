"""The Prefect flow on a tiny, real DVC project (tests/fixtures/dvc_project.py), under a Prefect test server.

The real pipeline (this repo's dvc.yaml) is exercised by tests/test_dvc_pipeline.py.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")  # torn down after this module: forked DataLoader workers of later tests must not inherit it
def prefect_server(tmp_path_factory):
    """One Prefect test server for the module (its first start migrates a SQLite DB: allow 90 s)."""
    home = tmp_path_factory.mktemp("prefect_home")
    old = {k: os.environ.get(k) for k in ("PREFECT_HOME", "PREFECT_API_URL")}
    os.environ["PREFECT_HOME"] = str(home)
    os.environ.pop("PREFECT_API_URL", None)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        from prefect.settings import PREFECT_API_URL

        yield PREFECT_API_URL.value()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _task_runs(flow_run_id):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                     sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=200)
    return {tr.name: tr for tr in runs}


def _logs(flow_run_id) -> str:
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        logs, offset = [], 0
        while True:  # the API serves at most 200 logs per call
            page = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200,
                                    offset=offset, sort=LogSort.TIMESTAMP_ASC)
            logs += page
            offset += len(page)
            if len(page) < 200:
                break
    return "\n".join(log.message for log in logs)


@pytest.fixture
def tiny(tmp_path, monkeypatch, make_tiny_project):
    root = make_tiny_project(tmp_path / "tiny")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("SLOTCON_PARENT_RUN_ID", raising=False)
    return root


@pytest.mark.slow
def test_flow_runs_stages_in_order_then_nothing(prefect_server, tiny):
    from mlflow import MlflowClient

    from pipelines.dvcgraph import load_stages
    from pipelines.flow import slotcon_pipeline

    assert [s.name for s in load_stages(tiny)] == ["a", "b", "c", "d"]
    state = slotcon_pipeline(repo_dir=str(tiny), retries=0, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert {n: r["status"] for n, r in result["stages"].items()} == dict.fromkeys("abcd", "ran")
    runs = _task_runs(state.state_details.flow_run_id)
    assert set(runs) >= {"a", "b", "c", "d"}
    assert all(tr.state.is_completed() for tr in runs.values()), {n: tr.state.name for n, tr in runs.items()}
    order = sorted("abcd", key=lambda n: runs[n].start_time)
    assert order.index("a") == 0 and order.index("b") < order.index("d")
    for n in "abcd":
        assert json.loads((tiny / "metrics" / f"{n}.json").read_text())["nested"]["seed"] == 3
    logs = _logs(state.state_details.flow_run_id)
    assert "stage b: reading ['out/a.txt']" in logs  # the stage's own stdout, streamed into the Prefect log
    assert "Running stage 'd'" in logs

    # MLflow: one parent (pipeline) with one child per stage, metrics copied onto the parent
    client = MlflowClient(f"sqlite:///{tiny / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    parents = client.search_runs([exp.experiment_id], "tags.`slotcon.pipeline` = '1'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["prefect.flow_run_id"] == str(state.state_details.flow_run_id)
    assert parent.data.tags["git.commit"] not in ("", "unknown")
    assert parent.data.metrics["d.value"] == json.loads((tiny / "metrics/d.json").read_text())["value"]
    assert parent.data.params["scenes.seed"] == "3"
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.data.tags["slotcon.stage"] for c in children) == ["a", "b", "c", "d"]
    assert all(c.info.status == "FINISHED" for c in children)
    assert all(c.data.tags["prefect.flow_run_id"] == parent.data.tags["prefect.flow_run_id"] for c in children)
    assert len(client.get_metric_history(children[0].info.run_id, "loss")) == 3

    assert parent.info.run_name.startswith("HEAD ")  # nothing varied against the committed params
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"params.yaml", "dvc.lock"}
    assert result["headline"]["d.value"] == parent.data.metrics["d.value"]
    assert result["mlflow_url"].endswith(f"/runs/{parent.info.run_id}?workflowType=machine_learning")

    # a second run re-executes nothing: DVC reports every stage up to date, and no MLflow run is kept for it
    state2 = slotcon_pipeline(repo_dir=str(tiny), retries=0, return_state=True)
    assert state2.is_completed()
    result2 = state2.result()
    assert {n: r["status"] for n, r in result2["stages"].items()} == dict.fromkeys("abcd", "up to date")
    assert all((tiny / "attempts" / n).read_text() == "x" for n in "abcd")
    assert "didn't change, skipping" in _logs(state2.state_details.flow_run_id)
    assert result2["noop"] and result2["parent_run_id"] is None
    assert [r.info.run_id for r in client.search_runs([exp.experiment_id], "tags.`slotcon.pipeline` = '1'")] == [
        parent.info.run_id]  # the no-op parent went to MLflow's deleted runs


@pytest.mark.slow
def test_failing_stage_retries_then_stops_downstream(prefect_server, tiny):
    from mlflow import MlflowClient

    from pipelines.flow import slotcon_pipeline

    (tiny / "FAIL_b").touch()
    state = slotcon_pipeline(repo_dir=str(tiny), retries=1, retry_delay_seconds=0, return_state=True)
    assert state.is_failed()
    assert (tiny / "attempts" / "b").read_text() == "xx"  # 1 try + 1 retry
    assert not (tiny / "attempts" / "d").exists()  # downstream of b: never started
    assert (tiny / "attempts" / "c").read_text() == "x"  # independent branch still ran
    runs = _task_runs(state.state_details.flow_run_id)
    assert runs["a"].state.is_completed() and runs["c"].state.is_completed()
    assert runs["b"].state.is_failed() and runs["b"].run_count == 2
    assert runs["d"].state.is_cancelled() and "upstream stage b failed" in runs["d"].state.message
    logs = _logs(state.state_details.flow_run_id)
    assert "boom: tiny stage b failed on purpose" in logs
    assert "boom: tiny stage b failed on purpose" in (state.message or "") or "pipeline failed at stage b" in logs

    client = MlflowClient(f"sqlite:///{tiny / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`slotcon.pipeline` = '1'")
    assert parent.info.status == "FAILED"
    # the failure hook left a record a script (or a person) finds without the UI
    (record,) = [json.loads(ln) for ln in (tiny / ".slotcon" / "failures.jsonl").read_text().splitlines()]
    assert record["state"] == "Failed" and record["flow_run"] == str(state.state_details.flow_run_id)
    assert "stage b" in record["message"]
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    statuses = sorted((c.data.tags["slotcon.stage"], c.info.status) for c in children)
    assert statuses == [("a", "FINISHED")] + [("b", "FAILED")] * 2 + [("c", "FINISHED")]


@pytest.mark.slow
def test_params_overrides_run_as_dvc_experiment(prefect_server, tiny, venv_env):
    from pipelines.flow import slotcon_pipeline

    before = (tiny / "params.yaml").read_text()
    state = slotcon_pipeline(repo_dir=str(tiny), targets=["b"], params_overrides={"scenes.seed": 7}, retries=0,
                             return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert list(result["stages"]) == ["a", "b"]  # the target and its upstream only
    assert json.loads((tiny / "metrics/a.json").read_text())["nested"]["seed"] == 7
    assert (tiny / "params.yaml").read_text() == before  # restored
    shown = subprocess.run(["dvc", "exp", "show", "--json"], cwd=tiny, env=venv_env(), capture_output=True, text=True,
                           check=True).stdout

    def find(node):  # the experiment's entry anywhere in `dvc exp show --json`
        if isinstance(node, dict):
            if node.get("name") == result["experiment"]:
                return node
            node = list(node.values())
        if isinstance(node, list):
            return next((hit for hit in map(find, node) if hit), None)
        return None

    exp = find(json.loads(shown))
    assert exp is not None, shown[:2000]
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tiny / 'mlflow.db'}")
    (parent,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                                   "tags.`slotcon.pipeline` = '1'")
    assert parent.info.run_name == f"{result['experiment']}: scenes.seed=7 [b]"  # named after what varied
    assert parent.data.tags["dvc.experiment"] == result["experiment"]
    assert '"seed": 7' in json.dumps(exp), json.dumps(exp)[:2000]
    assert "metrics/a.json" in json.dumps(exp)  # git-ignored metrics are saved with the experiment


def test_select_stages_adds_upstream_and_rejects_unknown(tmp_path, make_tiny_project):
    from pipelines.dvcgraph import load_stages, select_stages

    stages = load_stages(make_tiny_project(tmp_path / "p"))
    assert [s.name for s in stages] == ["a", "b", "c", "d"]  # DAG order, ties in dvc.yaml order
    assert [s.name for s in select_stages(stages, ["d"])] == ["a", "b", "d"]
    assert [s.name for s in select_stages(stages, ["c", "b"])] == ["a", "b", "c"]
    assert [s.metrics for s in stages][0] == ("metrics/a.json",)
    with pytest.raises(ValueError, match="no stage"):
        select_stages(stages, ["nope"])


def test_normalize_overrides():
    from pipelines.dvcgraph import normalize_overrides

    assert normalize_overrides({"pretrain.epochs": 5, "detect.steps": [1, 2]}) == [
        "pretrain.epochs=5", "detect.steps=[1, 2]"]
    assert normalize_overrides(["pretrain.epochs=5"]) == ["pretrain.epochs=5"]
    with pytest.raises(ValueError):
        normalize_overrides(["pretrain.epochs"])


def test_real_dvc_yaml_graph_is_a_chain_from_scenes(repo_root):
    """Structure-wide wiring of this repo's dvc.yaml: every stage reachable, DAG order as documented."""
    from pipelines.dvcgraph import load_stages

    stages = load_stages(repo_root)
    names = [s.name for s in stages]
    assert names[:2] == ["check", "scenes"]
    pos = {n: i for i, n in enumerate(names)}
    for s in stages:
        assert all(pos[u] < pos[s.name] for u in s.upstream)
    # the params check is upstream of every stage: a typo stops `dvc repro` before any stage deletes its outs
    assert all("check" in s.upstream for s in stages[1:])
    expected = ["check", "scenes", "prepare", "shard", "pretrain", "export", "detect", "segment", "unsup_seg", "viz"]
    assert [n for n in names if n in expected] == [n for n in expected if n in names]
    # every stage but the first depends on some other stage's outs
    assert all(s.upstream for s in stages[1:])


@pytest.mark.slow
def test_prefect_yaml_deployments_and_schedules_apply(prefect_server, tmp_path, venv_env):
    """`prefect deploy --all` with this repo's prefect.yaml against the test server; schedules read back."""
    import yaml
    from prefect import get_client

    spec = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    assert all(d["entrypoint"] == "pipelines/flow.py:slotcon_pipeline" for d in spec["deployments"])
    pool = spec["deployments"][0]["work_pool"]["name"]
    env = {**venv_env(), "PREFECT_API_URL": prefect_server, "PWD": str(REPO_ROOT),
           "PREFECT_HOME": os.environ["PREFECT_HOME"], "SLOTCON_GIT_URL": str(REPO_ROOT)}
    for cmd in (["prefect", "work-pool", "create", pool, "--type", "process", "--overwrite"],
                ["prefect", "--no-prompt", "deploy", "--all"]):
        out = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with get_client(sync_client=True) as client:
        for d in spec["deployments"]:
            dep = client.read_deployment_by_name(f"slotcon-pipeline/{d['name']}")
            assert dep.work_pool_name == pool and dep.entrypoint == d["entrypoint"]
            clone, workdir, _dvc_pull = dep.pull_steps  # code cloned per flow run, not a pinned checkout
            assert clone["prefect.deployments.steps.git_clone"]["repository"] == str(REPO_ROOT)
            assert workdir == {"prefect.deployments.steps.set_working_directory":
                               {"directory": "{{ clone.directory }}"}}
            crons = [s.schedule.cron for s in client.read_deployment_schedules(dep.id)]
            assert crons == [s["cron"] for s in d["schedules"]]
            assert dep.parameters == d["parameters"]


def test_dvc_yaml_wiring(repo_root):
    """Every stage: `slotcon <stage>` route exists, its module is a dep, params sections exist, metrics uncached."""
    import yaml

    from components.cli import STAGES
    from components.config import SECTIONS

    spec = yaml.safe_load((repo_root / "dvc.yaml").read_text())
    problems = []
    for name, st in spec["stages"].items():
        words = st["cmd"].split()
        if words[:1] != ["slotcon"] or len(words) < 2 or words[1] not in STAGES:
            problems.append(f"{name}: cmd {st['cmd']!r} is not `slotcon <stage> ...`")
            continue
        module_file = STAGES[words[1]][0].replace(".", "/") + ".py"
        deps = st.get("deps", [])
        if not any(module_file == d or module_file.startswith(d.rstrip("/") + "/") for d in deps):
            problems.append(f"{name}: its module {module_file} is not among its deps")
        for p in st.get("params", []):
            section = (p if isinstance(p, str) else next(iter(p))).split(".")[0]
            if section not in SECTIONS:
                problems.append(f"{name}: params {p!r} is not a section of params.yaml")
        for m in st.get("metrics", []):
            path, opts = (m, {}) if isinstance(m, str) else next(iter(m.items()))
            if not path.startswith("metrics/") or (opts or {}).get("cache", True):
                problems.append(f"{name}: metrics {path} must be metrics/*.json with cache: false")
            if f"--metrics {path}" not in st["cmd"]:
                problems.append(f"{name}: metrics {path} is not passed to the command")
    assert not problems, "\n".join(problems)


def test_bad_targets_and_overrides_fail_in_one_line_before_prefect(tmp_path, capsys, make_tiny_project):
    """`python -m pipelines.flow` checks its arguments before Prefect starts: one line, exit status 2."""
    import time

    from pipelines.flow import main

    root = make_tiny_project(tmp_path / "p")
    cases = [(["--targets", "nosuchstage"], "no stage(s) ['nosuchstage']"),
             (["-S", "scenes.seed"], "must look like 'section.key=value'"),
             (["-S", "scenes.sed=4"], "'scenes.sed' is not a key of params.yaml"),
             (["-S", "scenes.seed=[1"], "not a valid override")]
    for args, needle in cases:
        t0 = time.perf_counter()
        assert main([*args, "--repo-dir", str(root)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and needle in err, err
        assert time.perf_counter() - t0 < 60
    assert not (root / "mlflow.db").exists() and not (root / "attempts").exists()
