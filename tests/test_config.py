import difflib

import pytest
import yaml
from pydantic import create_model

from components.check import required_sections
from components.cli import main
from components.config import (SECTIONS, ConfigError, PretrainConfig, knob, load_all, load_section, parse_section,
                               parse_yaml, resume_safe_keys)
from components.config import params_file
from components.config.schema import resume_safe_fields, subsection
from components.engine import checkpoint as ckpt


def test_defaults_of_params_yaml_load(repo_root):
    sections = load_all(repo_root / "params.yaml")
    assert set(sections) == set(SECTIONS)
    assert sections["pretrain"].slotcon.teacher_temp == 0.07 and sections["pretrain"].slotcon.student_temp == 0.1


def test_params_yaml_is_what_the_schema_generates(repo_root, capsys):
    """params.yaml is written by `slotcon params --write`; an edit of one without the other fails here (and in CI)."""
    assert main(["params", "--check", "--params", str(repo_root / "params.yaml")]) == 0, capsys.readouterr().err


def test_generated_params_hold_the_schema_defaults():
    """What DVC tracks (the values of the generated file, read as YAML 1.1 and 1.2) is every section's default."""
    text = params_file.render()
    defaults = {name: cls().model_dump() for name, cls in SECTIONS.items()}
    assert yaml.safe_load(text) == defaults and parse_yaml(text, "params.yaml") == defaults


def test_a_changed_default_or_an_edited_file_fails_the_check(repo_root, tmp_path, monkeypatch, capsys):
    changed = create_model("PretrainConfig", __base__=PretrainConfig,
                           epochs=(int, knob(4, "paper: 800 (COCO / COCO+)", ge=1)))
    before, after = params_file.render(), params_file.render({**SECTIONS, "pretrain": changed})
    assert [d for d in difflib.ndiff(before.splitlines(), after.splitlines()) if d[:1] in "+-"] == [
        "-   epochs: 3              # paper: 800 (COCO / COCO+)",
        "+   epochs: 4              # paper: 800 (COCO / COCO+)"]
    repo_params = repo_root / "params.yaml"
    monkeypatch.setitem(SECTIONS, "pretrain", changed)
    assert main(["params", "--check", "--params", str(repo_params)]) == 1
    assert capsys.readouterr().err.strip() == (f"{repo_params}: differs from what the schema in components/config/ "
                                               "generates; run `slotcon params --write`")
    p = tmp_path / "params.yaml"
    p.write_text(before)
    assert main(["params", "--write", "--params", str(p)]) == 0
    assert yaml.safe_load(p.read_text())["pretrain"]["epochs"] == 4 and p.read_text() == after
    monkeypatch.undo()
    p.write_text(before.replace("  seed: 0                # write-time shuffle", "  seed: 1  # write-time shuffle"))
    assert main(["params", "--check", "--params", str(p)]) == 1
    assert "run `slotcon params --write`" in capsys.readouterr().err


def _other(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    return [*value, value[-1]] if isinstance(value, list) else f"{value}x"


def test_resume_free_keys_are_the_fields_marked_resume_safe():
    """engine/checkpoint.py leaves the resume_safe keys out of a run's fingerprint (by top-level name): exactly the
    marked fields of each checkpointed section, and none of their run-defining ones."""
    assert ckpt.RESUME_FREE_KEYS == resume_safe_keys() == {
        "num_workers", "save_every_steps", "log_every_steps", "compile", "nproc_per_node", "nnodes",
        "save_every", "num_vis", "log_model", "compare_random"}
    for cls in SECTIONS.values():  # the fingerprint filters top-level keys only: a subsection can't mark one
        for info in cls.model_fields.values():
            assert subsection(info) is None or not resume_safe_fields(subsection(info))
    for name in ("pretrain", "detect", "segment"):
        cls = SECTIONS[name]
        assert set(cls.model_fields) & ckpt.RESUME_FREE_KEYS == set(resume_safe_fields(cls)), name
        base = {k: v for k, v in cls().model_dump().items() if not isinstance(v, dict)}
        h0 = ckpt.fingerprint(base)[0]
        for key, value in base.items():
            same = ckpt.fingerprint(dict(base, **{key: _other(value)}))[0] == h0
            assert same == (key in resume_safe_fields(cls)), f"{name}.{key}"


@pytest.mark.parametrize(
    "section,raw,needle",
    [
        ("pretrain", {"batch_sise": 32}, "unknown key pretrain.batch_sise"),
        ("pretrain", {"batch_size": "32"}, "pretrain.batch_size='32' is invalid"),
        ("pretrain", {"slotcon": {"teacher_temp": -0.1}}, "pretrain.slotcon.teacher_temp=-0.1 is invalid"),
        ("pretrain", {"slotcon": {"arch": "vit"}}, "pretrain.slotcon.arch='vit' is invalid"),
        ("pretrain", {"slotcon": {"num_protos": 8}}, "unknown key pretrain.slotcon.num_protos (allowed: arch,"),
        ("pretrain", {"slotcon": {"base_lr": 0.1, "min_lr": 0.5}}, "pretrain.slotcon.min_lr=0.5 must be <= base_lr"),
        ("pretrain", {"batch_size": 100, "nproc_per_node": 8}, "pretrain.batch_size=100 is not divisible by world size 8"),
        ("scenes", {"min_objects": 6, "max_objects": 3}, "min_objects=6 must be <= max_objects=3"),
        ("data", {"source": "coco"}, "needs data.coco_root"),
        ("detect", {"init": "imagenet"}, "init='imagenet'"),
        ("detect", {"iters": 10, "steps": [20]}, "must be increasing and < iters=10"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_key(section, raw, needle):
    with pytest.raises(ConfigError) as exc:
        parse_section(section, raw, "params.yaml")
    msg = str(exc.value)
    assert needle in msg, msg
    assert "\n" not in msg and msg.startswith("params.yaml: ")


def test_unknown_section_and_missing_file(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("pretrian:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \['pretrian'\]"):
        load_section("pretrain", p)
    with pytest.raises(ConfigError, match="params file not found"):
        load_section("pretrain", tmp_path / "nope.yaml")


def test_cli_reports_bad_params_in_one_line(tmp_path, capsys, repo_root):
    p = tmp_path / "params.yaml"
    p.write_text((repo_root / "params.yaml").read_text().replace("  epochs: 3 ", "  epochs: 0 "))
    assert main(["check", "--params", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pretrain.epochs=0 is invalid" in err


def test_check_requires_the_sections_dvc_yaml_uses(tmp_path, capsys):
    """`slotcon check` beside a dvc.yaml requires tracking + the sections its stages list under params."""
    (tmp_path / "dvc.yaml").write_text("stages:\n  a:\n    cmd: x\n    params: [scenes.seed]\n")
    p = tmp_path / "params.yaml"
    p.write_text("tracking: {}\nscenes:\n  seed: 1\n")
    assert required_sections(p) == ["tracking", "scenes"]
    assert main(["check", "--params", str(p), "--out", str(tmp_path / "ok.txt")]) == 0
    assert (tmp_path / "ok.txt").is_file()
    p.write_text("tracking: {}\n")
    assert main(["check", "--params", str(p)]) == 2
    assert "section(s) scenes missing" in capsys.readouterr().err


def test_params_yaml_numbers_follow_yaml_1_2(tmp_path):
    data = parse_yaml("a: 1e-6\nb: -2E+3\nc: 10\nd: 1.5\ne: 1e5x\nf: '1e-6'\n", "p.yaml")
    assert data == {"a": 1e-6, "b": -2000.0, "c": 10, "d": 1.5, "e": "1e5x", "f": "1e-6"}
    assert isinstance(data["a"], float) and isinstance(data["c"], int)


def test_check_refuses_a_server_artifact_location_with_a_local_store(tmp_path, capsys, monkeypatch):
    """`mlflow-artifacts:` only means something on an MLflow server: with the SQLite default it is a one-line error at
    `slotcon check` (before `dvc repro` deletes any output), and fine once the tracking URI is a server."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("SLOTCON_ARTIFACT_LOCATION", raising=False)
    (tmp_path / "dvc.yaml").write_text("stages:\n  a:\n    cmd: x\n")  # only tracking is required
    p = tmp_path / "params.yaml"
    p.write_text("tracking:\n  artifact_location: mlflow-artifacts:/team\n")
    assert main(["check", "--params", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "mlflow-artifacts:/team needs an MLflow server" in err and str(p) in err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert main(["check", "--params", str(p)]) == 0
