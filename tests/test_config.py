import pytest

from components.config import SECTIONS, ConfigError, load_all, load_section, parse_section


def test_defaults_of_params_yaml_load(repo_root):
    sections = load_all(repo_root / "params.yaml")
    assert set(sections) == set(SECTIONS)
    assert sections["pretrain"].slotcon.teacher_temp == 0.07 and sections["pretrain"].slotcon.student_temp == 0.1


def test_every_section_model_defaults_equal_params_yaml(repo_root):
    """params.yaml is the demo; the typed defaults must say the same thing (one source of truth for docs)."""
    sections = load_all(repo_root / "params.yaml")
    for name, cls in SECTIONS.items():
        assert sections[name] == cls(), f"params.yaml section {name} differs from components/config.py defaults"


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
    from components.cli import main

    p = tmp_path / "params.yaml"
    p.write_text((repo_root / "params.yaml").read_text().replace("  epochs: 3 ", "  epochs: 0 "))
    assert main(["check", "--params", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pretrain.epochs=0 is invalid" in err


def test_check_requires_the_sections_dvc_yaml_uses(tmp_path, capsys):
    """`slotcon check` beside a dvc.yaml requires tracking + the sections its stages list under params."""
    from components.check import required_sections
    from components.cli import main

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
    from components.config import parse_yaml

    data = parse_yaml("a: 1e-6\nb: -2E+3\nc: 10\nd: 1.5\ne: 1e5x\nf: '1e-6'\n", "p.yaml")
    assert data == {"a": 1e-6, "b": -2000.0, "c": 10, "d": 1.5, "e": "1e5x", "f": "1e-6"}
    assert isinstance(data["a"], float) and isinstance(data["c"], int)
