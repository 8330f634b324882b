"""The paired comparison of two evaluations: exact McNemar p-values and `opensora-gym compare-evals`."""

import json
import math

import pytest

from opensora_gym.intervals import mcnemar_exact
from trainers import cli
from trainers.compare import compare_evaluations, load_outcomes


def test_mcnemar_exact_is_twice_the_binomial_tail_of_the_smaller_count():
    # Against the binomial tail computed term by term, and the values quoted in experiments/libero_spatial_small.
    for gained, lost in ((18, 9), (12, 25), (0, 6), (3, 3), (40, 1)):
        n = gained + lost
        tail = sum(math.comb(n, k) * 0.5**n for k in range(min(gained, lost) + 1))
        assert mcnemar_exact(gained, lost) == pytest.approx(min(1.0, 2 * tail), rel=1e-12)
        assert mcnemar_exact(gained, lost) == mcnemar_exact(lost, gained)
    assert round(mcnemar_exact(18, 9), 2) == 0.12 and round(mcnemar_exact(12, 25), 3) == 0.047
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)


@pytest.mark.parametrize(("gained", "lost"), [(-1, 2), (1.5, 2), (True, 2), ("3", 2)])
def test_mcnemar_exact_rejects_what_is_not_a_count(gained, lost):
    with pytest.raises(ValueError, match="gained and lost must be"):
        mcnemar_exact(gained, lost)


def write_eval(path, successes):
    outcomes = [
        {"episode": {"task_id": task, "trial_id": trial}, "task": f"task {task}", "success": success, "length": 220}
        for (task, trial), success in successes.items()
    ]
    path.write_text(json.dumps({"episodes": len(outcomes), "outcomes": outcomes}))
    return path


def test_compare_evals_pairs_the_starts_and_prints_the_table(tmp_path, capsys):
    starts = [(task, trial) for task in (0, 1) for trial in range(10)]
    base = {start: start[1] < 5 for start in starts}  # 10 of 20
    other = {start: start[1] < 7 if start[0] == 0 else start[1] in (0, 1, 2, 3, 9) for start in starts}
    base_file, other_file = write_eval(tmp_path / "a.json", base), write_eval(tmp_path / "b.json", other)
    out = tmp_path / "cmp.json"
    cli.main(["compare-evals", str(base_file), str(other_file), "--out", str(out)])
    result = json.loads(out.read_text())
    # task 0 gains trials 5 and 6; task 1 gains trial 9 and loses trial 4
    assert (result["gained"], result["lost"], result["both"], result["neither"]) == (3, 1, 9, 7)
    assert result["base"]["successes"] == 10 and result["other"]["successes"] == 12
    assert result["difference"] == pytest.approx(0.1) and result["mcnemar_p"] == pytest.approx(mcnemar_exact(3, 1))
    assert result["other"]["ci_low"] < 0.6 < result["other"]["ci_high"]
    printed = capsys.readouterr().out
    assert "3 gained, 1 lost" in printed and "exact McNemar p = 0.625" in printed
    # the order of the outcomes in the file does not matter
    shuffled = tmp_path / "c.json"
    data = json.loads(other_file.read_text())
    shuffled.write_text(json.dumps({**data, "outcomes": data["outcomes"][::-1]}))
    assert compare_evaluations(load_outcomes(base_file), load_outcomes(shuffled)) == result


def test_compare_evals_refuses_different_starts_and_files_that_are_not_evaluations(tmp_path, capsys):
    base = write_eval(tmp_path / "a.json", {(0, trial): True for trial in range(4)})
    other = write_eval(tmp_path / "b.json", {(0, trial): True for trial in range(1, 5)})
    with pytest.raises(SystemExit, match="expected the same starts in both evaluations, got 4 and 4 with 3 in common"):
        cli.main(["compare-evals", str(base), str(other)])
    (tmp_path / "audit.json").write_text(json.dumps({"summary": {}}))
    with pytest.raises(SystemExit, match=r"expected an evaluation's eval_results.json .* \(KeyError: 'outcomes'\)"):
        cli.main(["compare-evals", str(base), str(tmp_path / "audit.json")])
    twice = write_eval(tmp_path / "twice.json", {(0, 0): True})
    data = json.loads(twice.read_text())
    twice.write_text(json.dumps({"outcomes": data["outcomes"] * 2}))
    with pytest.raises(ValueError, match="expected each start once and at least one, got 2 outcomes for 1 starts"):
        load_outcomes(twice)
