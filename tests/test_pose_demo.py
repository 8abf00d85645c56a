"""`ckd demo --pose` on a tiny plan: every stage runs and the report is written."""

import json

import pytest

from ckd.pose.demo import PoseDemoPlan, run_pose_demo


@pytest.mark.slow
def test_pose_demo_runs_every_stage(tmp_path):
    plan = PoseDemoPlan(train_images=16, val_images=6, input_size=(32, 24),
                        mentors=(("teacher", "resnet8-simcc", 2, 1),
                                 ("peer", "resnet8-simcc", 1, 2)),
                        seeds=(0, 1), epochs=1, views=2, batch_size=16)
    res = run_pose_demo(tmp_path, plan)
    report = tmp_path / "report"
    table = (report / "table.md").read_text().splitlines()
    assert len(table) == 2 + 2 + 4  # header, 2 mentors, 4 methods
    assert [r.split("|")[2].strip() for r in table[4:]] == ["NOKD", "KD (teacher)", "AVER",
                                                            "ClassroomKD"]
    assert (report / "pose.png").stat().st_size > 0
    saved = json.loads((report / "results.json").read_text())
    assert saved["students"] == res["students"] and len(saved["students"]["aver"]) == 2
    assert all(0 <= r["pck"] <= 100 for runs in saved["students"].values() for r in runs)
