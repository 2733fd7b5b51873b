import json

import pytest

from verm_local.constants import CATEGORIES, TASKS
from verm_local.errors import InputError
from verm_local.prompts import default_prompt, load_prompt
from verm_local.reward import reward
from verm_local.tasks import profile


def test_reward_clips_and_scales(monkeypatch):
    assert reward(0) == 1.0
    assert reward(25) == pytest.approx(0.5)
    assert reward(50) == 0.0
    assert reward(80) == 0.0
    assert reward(10, scale=20) == pytest.approx(0.5)
    monkeypatch.setenv("VERM_LOCAL_REWARD_SCALE", "100")
    assert reward(25) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        reward(1, scale=0)


@pytest.mark.parametrize("task", TASKS)
def test_default_prompt_names_every_category_and_the_rubric(task):
    p = default_prompt(profile(task))
    for c in CATEGORIES[task]:
        assert c in p and f"{c}_count" in p
    assert "Image 1" in p and "Image 2" in p
    assert "1 = minor" in p and "3 = severe" in p
    assert "JSON only" in p


def test_prompt_file_plain_and_per_task(tmp_path):
    plain = tmp_path / "p.txt"
    plain.write_text("  exact training prompt  \n")
    assert load_prompt(profile("svg"), plain) == "exact training prompt"
    table = tmp_path / "p.json"
    table.write_text(json.dumps({"chart": "chart prompt", "table": "table prompt"}))
    assert load_prompt(profile("table"), table) == "table prompt"
    with pytest.raises(InputError, match="no prompt for task 'svg'"):
        load_prompt(profile("svg"), table)
    with pytest.raises(InputError, match="not found"):
        load_prompt(profile("chart"), tmp_path / "missing.txt")
    empty = tmp_path / "e.txt"
    empty.write_text("\n")
    with pytest.raises(InputError, match="empty"):
        load_prompt(profile("chart"), empty)
