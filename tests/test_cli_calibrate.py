"""`calibrate` and `trim` from the command line, on the demo model."""

import json

from ce_export.cli import main


def test_calibrate_then_trim_then_build(tmp_path, capsys):
    stats = tmp_path / "calibration"
    assert main(["calibrate", "demo", "--out", str(stats), "--seq-len", "32", "--num-sequences", "16"]) == 0
    assert (stats / "expert_usage.png").read_bytes()[:4] == b"\x89PNG"
    ranges = json.loads((stats / "calibration.json").read_text())["activation_ranges"]
    assert len(ranges) == 21 and ranges["lm_head"]["amax"] > 0  # 4 x (q, k, v, o, experts) + LM head
    trimmed = tmp_path / "trimmed"
    assert main(["trim", "demo", "--stats", str(stats / "calibration.json"), "--out", str(trimmed),
                 "--expert-drop", "0.25"]) == 0
    config = json.loads((trimmed / "config.json").read_text())
    assert sum(config["num_experts"]) == 24 and len(set(config["num_experts"])) > 1
    assert main(["build", str(trimmed), "--out", str(tmp_path / "build")]) == 0
    assert "parity PASSED" in capsys.readouterr().out


def test_trim_rejects_a_bad_fraction(tmp_path, capsys):
    stats = tmp_path / "calibration"
    assert main(["calibrate", "demo", "--out", str(stats), "--seq-len", "16", "--num-sequences", "8"]) == 0
    capsys.readouterr()
    code = main(["trim", "demo", "--stats", str(stats / "calibration.json"), "--out", str(tmp_path / "t"),
                 "--expert-drop", "1.5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "expert" in err[0]
    assert not (tmp_path / "t").exists()
