"""The greedy flattening plan, targets, plan files and baseline selections, checked by hand."""

import json

import numpy as np
import pytest

from flattengpt.methods.gromov import gromov_span
from flattengpt.methods.shortgpt import shortgpt_blocks
from flattengpt.methods import get_method
from flattengpt.methods.base import SimilarityViews
from flattengpt.plan import Plan, blocks_for_ratio, greedy_plan, make_plan, plan_from_file, span_plan


def symmetric(upper):
    """A symmetric matrix with unit diagonal from its strict upper triangle given row by row."""
    n = len(upper) + 1
    S = np.eye(n)
    for i, row in enumerate(upper):
        S[i, i + 1:] = row
        S[i + 1:, i] = row
    return S


# L = 5 blocks (0..4), so S is 6 x 6 over X0..X5. S[4, 5] = 0.99 is a trap: X5 is the output of the
# last block, and no merge score ever reads it (a merge of blocks a..c scores S[a, c], not S[a, c+1]).
#            X1    X2    X3    X4    X5
S = symmetric([
    [0.80, 0.60, 0.40, 0.30, 0.20],  # X0
    [0.90, 0.85, 0.70, 0.50],        # X1
    [0.95, 0.75, 0.55],              # X2
    [0.88, 0.60],                    # X3
    [0.99],                          # X4
])


def test_greedy_unlimited_by_hand():
    # step 1: pairs [0]+[1] S[0,1]=.80, [1]+[2] S[1,2]=.90, [2]+[3] S[2,3]=.95, [3]+[4] S[3,4]=.88 -> [2,3]
    # step 2: [0]+[1] S[0,1]=.80, [1]+[2,3] S[1,3]=.85, [2,3]+[4] S[2,4]=.75               -> [1,2,3]
    # step 3: [0]+[1,2,3] S[0,3]=.40, [1,2,3]+[4] S[1,4]=.70                               -> [1,2,3,4]
    plan = greedy_plan(S, 3)
    assert plan.groups == [[0], [1, 2, 3, 4]]
    assert plan.steps == [
        {"step": 1, "left": [2], "right": [3], "merged": [2, 3], "score": 0.95},
        {"step": 2, "left": [1], "right": [2, 3], "merged": [1, 2, 3], "score": 0.85},
        {"step": 3, "left": [1, 2, 3], "right": [4], "merged": [1, 2, 3, 4], "score": 0.70},
    ]
    assert plan.removed_blocks == [2, 3, 4] and plan.remove_blocks == 3 and plan.kept_blocks == [0, 1]
    assert plan.group_scores == [None, 0.70]
    assert plan.options == {"max_group_size": None, "protect_first": False, "protect_last": False,
                            "source": "greedy"}


def test_greedy_does_not_use_the_symmetric_deletion_rule():
    # Deleting row and column l after merging l-1 and l would score [1]+[2,3] by S[1,2] = .90 in
    # step 2; the rule of METHOD.md scores it S[1,3] = .85. Make S[0,1] = .87 sit between the two:
    # the correct rule merges [0,1] in step 2, the symmetric one [1,2,3].
    T = S.copy()
    T[0, 1] = T[1, 0] = 0.87
    assert greedy_plan(T, 2).groups == [[0, 1], [2, 3], [4]]


def test_span_plan_by_hand():
    # k = 2: spans a..a+2 scored S[a, a+2]: a=0 .60, a=1 .85, a=2 .75 -> blocks 1-3 flattened into one
    plan = span_plan(S, 2)
    assert plan.groups == [[0], [1, 2, 3], [4]] and plan.remove_blocks == 2 and plan.group_scores == [None, 0.85, None]
    assert [(st["start"], st["score"], st["chosen"]) for st in plan.steps] == [(0, 0.60, False), (1, 0.85, True),
                                                                              (2, 0.75, False)]
    # k = 1 is the best single pair; no span ever reads S[4, 5] (.99: X5 is the last block's output)
    assert span_plan(S, 1).groups == [[0], [1], [2, 3], [4]]
    assert [st["start"] for st in span_plan(S, 1).steps] == [0, 1, 2, 3]
    # k = 3: a=0 S[0,3] .40, a=1 S[1,4] .70; protect_last rules a=1 out
    assert span_plan(S, 3).groups == [[0], [1, 2, 3, 4]]
    assert span_plan(S, 3, protect_last=True).groups == [[0, 1, 2, 3], [4]]
    assert span_plan(S, 3, protect_first=True).groups == [[0], [1, 2, 3, 4]]
    # ties go to the lower start
    T = S.copy()
    T[0, 2] = T[2, 0] = 0.85
    assert span_plan(T, 2).groups == [[0, 1, 2], [3], [4]]
    with pytest.raises(ValueError, match="max_group_size=2"):
        span_plan(S, 2, max_group_size=2)
    assert span_plan(S, 2, max_group_size=3).groups == [[0], [1, 2, 3], [4]]
    with pytest.raises(ValueError, match="remove fewer blocks"):
        span_plan(S, 4, protect_first=True)


def test_flattengpt_plan_criterion_span_is_one_group():
    views = SimilarityViews(cosine=S, angular_distance=np.zeros_like(S), block_influence=1 - np.diag(S, 1))
    plan = get_method({"method": "flattengpt", "plan_criterion": "span"}).choose(2, views=views, target={"remove_blocks": 2})
    assert plan.groups == [[0], [1, 2, 3], [4]] and plan.method == "flattengpt" and plan.options["source"] == "span"
    assert [layer.op for layer in plan.layers] == ["keep", "flatten", "keep"]
    greedy = get_method({"method": "flattengpt"}).choose(2, views=views, target={"remove_blocks": 2})
    assert greedy.groups == [[0], [1, 2, 3], [4]] and greedy.options["source"] == "greedy"
    assert get_method({"method": "flattengpt", "plan_criterion": "span"}).choose(
        1, views=views, target={"remove_blocks": 1}).groups == [[0], [1], [2, 3], [4]]


def test_max_group_size_two_gives_different_groups():
    # step 1: [2,3] (.95). step 2: [1]+[2,3] and [2,3]+[4] would make groups of 3 blocks, so the
    # only allowed pair is [0]+[1] (.80) -> [0,1]. Unlimited, step 2 merges [1]+[2,3] (.85) instead.
    plan = greedy_plan(S, 2, max_group_size=2)
    assert plan.groups == [[0, 1], [2, 3], [4]]
    assert [s["score"] for s in plan.steps] == [0.95, 0.80]
    assert greedy_plan(S, 2).groups == [[0], [1, 2, 3], [4]]


def test_error_when_constraints_leave_no_pair():
    # after [0,1] and [2,3] every remaining pair would exceed two blocks
    with pytest.raises(ValueError, match=r"stopped after 2 of 3 merges.*max_group_size=2"):
        greedy_plan(S, 3, max_group_size=2)
    with pytest.raises(ValueError, match=r"stopped after 3 of 4 merges.*protect_first=True"):
        greedy_plan(S, 4, protect_first=True)


def test_greedy_can_stop_below_the_best_partition():
    # 4 blocks, max_group_size=2: [0,1],[2,3] would remove 2 blocks, but the greedy search takes the
    # best pair [1,2] first and then every neighbour pair is too big. METHOD.md asks for the greedy
    # rule, so this is an error that names the way out, not a silent switch to another search.
    T = symmetric([[0.5, 0.1, 0.1, 0.1], [0.9, 0.1, 0.1], [0.5, 0.1], [0.1]])
    with pytest.raises(ValueError, match=r"stopped after 1 of 2 merges.*plan_file"):
        greedy_plan(T, 2, max_group_size=2)


def test_protect_last():
    # steps 1 and 2 as unlimited; step 3: [1,2,3]+[4] is forbidden, so [0]+[1,2,3] with S[0,3] = .40
    plan = greedy_plan(S, 3, protect_last=True)
    assert plan.groups == [[0, 1, 2, 3], [4]]
    assert plan.steps[-1]["score"] == 0.40


def test_protect_first():
    # S[0,1] = .99 is the best pair, but block 0 is protected: the next best, [2,3], is merged
    T = S.copy()
    T[0, 1] = T[1, 0] = 0.99
    assert greedy_plan(T, 1).groups == [[0, 1], [2], [3], [4]]
    assert greedy_plan(T, 1, protect_first=True).groups == [[0], [1], [2, 3], [4]]


def test_ties_lower_index_wins():
    flat = symmetric([[0.9, 0.5, 0.5], [0.9, 0.5], [0.9]])  # 3 blocks, S[l, l+1] = .9 for all
    plan = greedy_plan(flat, 1)
    assert plan.groups == [[0, 1], [2]]
    # a tie between a group and a single pair: [0,1]+[2] scores S[0,2], [2]+[3] scores S[2,3]
    T = symmetric([[0.9, 0.7, 0.1, 0.1], [0.5, 0.1, 0.1], [0.7, 0.1], [0.1]])  # 4 blocks
    # step 1: S[0,1] = .9 -> [0,1]; step 2: [0,1]+[2] S[0,2] = .7 ties [2]+[3] S[2,3] = .7 -> lower index
    assert greedy_plan(T, 2).groups == [[0, 1, 2], [3]]


def test_removing_all_blocks_is_invalid():
    assert greedy_plan(S, 4).groups == [[0, 1, 2, 3, 4]]
    for k in (0, 5, -1):
        with pytest.raises(ValueError, match="remove_blocks"):
            greedy_plan(S, k)


def test_similarity_must_be_square_and_finite():
    with pytest.raises(ValueError, match="square"):
        greedy_plan(np.ones((3, 4)), 1)
    bad = S.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        greedy_plan(bad, 1)


# ----------------------------------------------------------------------------- targets


def test_ratio_to_blocks_matches_the_paper():
    assert blocks_for_ratio(0.21, 6_738_415_616, 202_383_360) == 7  # LLaMA-2-7B: 6.99 -> 7 of 32
    assert blocks_for_ratio(0.24, 13_015_864_320, 317_726_720) == 10  # LLaMA-2-13B: 9.83 -> 10 of 40
    assert blocks_for_ratio(0.20, 68_976_648_192, 855_654_400) == 16  # LLaMA-2-70B: 16.12 -> 16 of 80
    assert blocks_for_ratio(0.21, 7_721_324_544, 202_395_648) == 8  # Qwen-1.5-7B: 8.01 -> 8 of 32
    assert blocks_for_ratio(0.25, 100, [10, 10, 10, 10]) == 3  # 2.5 rounds half up
    assert blocks_for_ratio(0.25, 100, [5, 15]) == 3  # mean block size 10
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match="ratio"):
            blocks_for_ratio(bad, 100, 10)


COUNTS = {"total": 1000, "per_block": [100, 110, 120, 130, 140]}  # 400 outside the blocks


def test_make_plan_counts_parameters():
    plan = make_plan(S, COUNTS, {"remove_blocks": 2})
    assert plan.groups == [[0], [1, 2, 3], [4]] and plan.removed_blocks == [2, 3]
    assert plan.params_before == 1000 and plan.params_after == 1000 - 120 - 130
    assert plan.ratio_achieved == pytest.approx(0.25)
    assert plan.target == {"remove_blocks": 2}


def test_make_plan_from_ratio():
    # 0.35 * 1000 / mean 120 = 2.92 -> k = 3: removes blocks 2, 3, 4 (120 + 130 + 140)
    plan = make_plan(S, COUNTS, {"ratio": 0.35})
    assert plan.remove_blocks == 3 and plan.target == {"ratio": 0.35}
    assert plan.ratio_achieved == pytest.approx(0.39)


def test_make_plan_options_from_target_or_argument():
    plan = make_plan(S, COUNTS, {"remove_blocks": 2, "max_group_size": 2})
    assert plan.groups == [[0, 1], [2, 3], [4]] and plan.options["max_group_size"] == 2
    # the stage passes the options separately, None meaning "not set"
    plan = make_plan(S, COUNTS, {"remove_blocks": 2}, {"max_group_size": None, "protect_first": None,
                                                        "protect_last": None})
    assert plan.options == {"max_group_size": None, "protect_first": False, "protect_last": False,
                            "source": "greedy"}


@pytest.mark.parametrize("target, field", [
    ({"remove_blocks": 5}, "remove_blocks"),
    ({"remove_blocks": True}, "remove_blocks"),
    ({"ratio": 0.01}, "ratio"),  # 0.08 blocks -> 0
    ({"ratio": 0.7}, "ratio"),  # 5.8 blocks -> 6 > 4
    ({"ratio": 1.2}, "ratio"),
    ({"remove_blocks": 3, "ratio": 0.3}, "exactly one"),
    ({}, "exactly one"),
    ({"remove_blocks": 2, "max_group_size": 1}, "max_group_size"),
])
def test_make_plan_errors_name_the_field(target, field):
    with pytest.raises(ValueError, match=field):
        make_plan(S, COUNTS, target)


def test_make_plan_ratio_error_when_constraints_block_it():
    with pytest.raises(ValueError, match=r"ratio: 0.48 \(k = 4 blocks\).*stopped after 3"):
        make_plan(S, COUNTS, {"ratio": 0.48, "protect_first": True})


def test_make_plan_checks_block_count():
    with pytest.raises(ValueError, match="covers 5 blocks"):
        make_plan(S, {"total": 100, "per_block": [10] * 4}, {"remove_blocks": 1})


def test_plan_json_round_trip():
    plan = make_plan(S, COUNTS, {"remove_blocks": 3})
    record = json.loads(json.dumps(plan.to_json()))
    assert record["removed_blocks"] == [2, 3, 4] and record["remove_blocks"] == 3
    assert record["num_layers_after"] == 2
    again = Plan.from_json({**record, "provenance": {"x": 1}})
    assert again == plan


def test_describe_groups():
    plan = make_plan(S, COUNTS, {"remove_blocks": 2})
    assert plan.describe_groups() == [
        "new block 0: block 0 kept",
        "new block 1: blocks 1-3 flattened (3 blocks, S[1,3] = 0.8500)",
        "new block 2: block 4 kept",
    ]


# ----------------------------------------------------------------------------- plan files


def test_plan_file_full_partition_json(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"groups": [[0], [1, 2], [3], [4]]}))
    plan = make_plan(S, COUNTS, {"plan_file": str(path)})
    assert plan.groups == [[0], [1, 2], [3], [4]] and plan.steps == []
    assert plan.options["source"] == "file" and plan.target == {"plan_file": str(path)}
    assert plan.group_scores == [None, 0.90, None, None]
    assert plan.params_after == 1000 - 120


def test_plan_file_only_merged_groups_yaml(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text("# merge blocks 3-4 and 0-1\ngroups:\n  - [3, 4]\n  - [0, 1]\n")
    plan = plan_from_file(path, 5)
    assert plan.groups == [[0, 1], [2], [3, 4]] and plan.removed_blocks == [1, 4]


@pytest.mark.parametrize("content, message", [
    ("groups: [[0, 5]]", r"groups\[0\] = \[0, 5\] has block 5 outside 0..4"),
    ("groups: [[1, 3]]", r"groups\[0\] = \[1, 3\] is not a run of consecutive blocks"),
    ("groups: [[3, 2]]", r"groups\[0\] = \[3, 2\] is not a run of consecutive blocks"),
    ("groups: [[0, 1], [1, 2]]", r"block 1 is in groups\[0\] = \[0, 1\] and in groups\[1\] = \[1, 2\]"),
    ("groups: [[]]", r"groups\[0\] = \[\] is not a non-empty list"),
    ("groups: [[0, x]]", r"is not a non-empty list of block indices"),
    ("groups: [[0], [1], [2]]", "nothing would be removed"),
    ("blocks: [[0, 1]]", "expected a mapping with a `groups` list"),
    ("groups: [[0, 1]", "not valid YAML"),
])
def test_invalid_plan_files(tmp_path, content, message):
    path = tmp_path / "plan.yaml"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        plan_from_file(path, 5)


def test_plan_file_must_respect_stated_constraints(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text("groups: [[0, 1, 2]]")
    with pytest.raises(ValueError, match="protected block 0"):
        make_plan(S, COUNTS, {"plan_file": str(path), "protect_first": True})
    with pytest.raises(ValueError, match="max_group_size=2"):
        make_plan(S, COUNTS, {"plan_file": str(path), "max_group_size": 2})


# ----------------------------------------------------------------------------- baselines


def test_shortgpt_blocks():
    bi = [0.5, 0.1, 0.3, 0.1, 0.2]
    assert shortgpt_blocks(bi, 1) == [1]  # tie .1 between blocks 1 and 3: lower index
    assert shortgpt_blocks(bi, 2) == [1, 3]
    assert shortgpt_blocks(bi, 3) == [1, 3, 4]
    assert shortgpt_blocks([0.2, 0.1, 0.2, 0.3], 2) == [0, 1]  # tie .2 at the boundary: block 0
    with pytest.raises(ValueError, match="remove_blocks"):
        shortgpt_blocks(bi, 5)


def test_gromov_span():
    D = symmetric([
        [0.30, 0.50, 0.60, 0.70],  # X0
        [0.20, 0.40, 0.60],        # X1
        [0.25, 0.50],              # X2
        [0.10],                    # X3
    ])  # L = 4 blocks
    # k = 1: d(0,1)=.30, d(1,2)=.20, d(2,3)=.25, d(3,4)=.10 -> block 3
    assert gromov_span(D, 1) == [3]
    # k = 2: d(0,2)=.50, d(1,3)=.40, d(2,4)=.50 -> blocks 1, 2
    assert gromov_span(D, 2) == [1, 2]
    # k = 3: d(0,3)=.60, d(1,4)=.60 -> tie, lower start: blocks 0, 1, 2
    assert gromov_span(D, 3) == [0, 1, 2]
