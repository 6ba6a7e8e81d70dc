"""Zero-shot evaluation: the shipped local task configs against lm-eval's stock tasks, row by row.

The local data (../shared/data/tasks/lm_eval_jsonl) is in the hub datasets' own layout, so the stock
configs can read it with only the dataset swapped (`stock_task_config(task, file, split)`). For PIQA,
ARC and WinoGrande the shipped task must render every row exactly as the stock task does. HellaSwag's
local rows lack the ctx_a/ctx_b split the stock `process_docs` needs; the shipped config rebuilds it
and then runs the stock function. Its tests (see the docstring of
test_hellaswag_renders_as_the_stock_task_on_rebuilt_hub_rows) check it against the stock task on
rebuilt hub rows, count what the rebuild changes against the local rows, and count the rows whose
split cannot be known offline.
"""

import inspect
import json
import math

import pytest

from flattengpt import zero_shot
from flattengpt.zero_shot import LOCAL_TASKS, build_task, headline_metric, local_data_file, stock_task_config

from .models_for_tests import SHARED, STORIES

DATA_DIR = SHARED / "tasks" / "lm_eval_jsonl" if SHARED is not None else None
needs_shared = pytest.mark.skipif(SHARED is None, reason="needs ../shared/data")

# the official evaluation-set sizes (PIQA valid, ARC test, HellaSwag valid, WinoGrande dev)
ITEM_COUNTS = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "winogrande": 1267, "hellaswag": 10042}
# config keys that name the data or the task rather than what is shown to the model or scored
DATA_KEYS = {"task", "tag", "dataset_path", "dataset_name", "dataset_kwargs", "training_split",
             "validation_split", "test_split", "metadata"}


def _same(a, b) -> bool:
    if callable(a) and callable(b):  # functions loaded twice (!function) are distinct objects
        return inspect.getsource(a) == inspect.getsource(b)
    return a == b


_TASK_CACHE: dict = {}


def _tasks(task: str):
    """(shipped task, stock task reading the same local file), built once per module."""
    if task not in _TASK_CACHE:
        from lm_eval.api.task import ConfigurableTask

        file, split = LOCAL_TASKS[task]
        stock = ConfigurableTask(config=stock_task_config(task, DATA_DIR / file, split))
        _TASK_CACHE[task] = build_task(task, DATA_DIR), stock
    return _TASK_CACHE[task]


# ----------------------------------------------------------------------------- errors and fallbacks


def test_headline_metric_prefers_acc_norm():
    assert headline_metric({"acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.6}) == "acc_norm"
    assert headline_metric({"acc": 0.5, "acc_stderr": 0.1}) == "acc"  # WinoGrande has no acc_norm
    with pytest.raises(ValueError, match="neither acc_norm nor acc"):
        headline_metric({"exact_match,none": 1.0})


def test_missing_local_file_names_the_config_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"evaluation\.zero_shot\.data_dir.*piqa_validation\.jsonl"):
        local_data_file("piqa", tmp_path)
    with pytest.raises(ValueError, match="no shipped local config for task 'boolq'"):
        local_data_file("boolq", tmp_path)


def test_build_task_falls_back_to_the_registry_name(tmp_path):
    # no data_dir: every task (the paper's five included) is left to lm-eval's registry (the hub)
    assert build_task("piqa") == "piqa"
    # a task with no shipped config goes to the registry even when data_dir is set
    assert build_task("boolq", tmp_path) == "boolq"
    assert set(LOCAL_TASKS) == set(zero_shot.PAPER_TASKS)
    assert {path.stem for path in zero_shot.TASKS_DIR.glob("*.yaml")} == set(LOCAL_TASKS)


def test_build_task_with_a_data_dir_lacking_the_file(tmp_path):
    pytest.importorskip("lm_eval")
    with pytest.raises(FileNotFoundError, match=r"evaluation\.zero_shot\.data_dir"):
        build_task("arc_easy", tmp_path)


# ----------------------------------------------------------------------------- configs and rendering


@pytest.mark.parametrize("task", ["piqa", "arc_easy", "arc_challenge", "winogrande", "hellaswag"])
def test_shipped_config_is_the_stock_config_but_for_the_data(task):
    pytest.importorskip("lm_eval")
    from lm_eval.tasks._yaml_loader import load_yaml

    shipped = load_yaml(zero_shot.TASKS_DIR / f"{task}.yaml")
    stock = stock_task_config(task)
    differ = DATA_KEYS
    if task == "hellaswag":  # a process_docs that rebuilds ctx_a/ctx_b, then calls the stock one
        import lm_eval.tasks.hellaswag.utils
        from flattengpt.lm_eval_tasks import stock_hellaswag

        differ = DATA_KEYS | {"process_docs"}
        wrapper, stock_fn = shipped["process_docs"], stock["process_docs"]
        assert wrapper.__name__ == stock_fn.__name__ == "process_docs" and not _same(wrapper, stock_fn)
        assert inspect.getsource(wrapper) == inspect.getsource(stock_hellaswag.process_docs)
        assert "stock_process_docs(" in inspect.getsource(wrapper)
        # the function the wrapper calls is lm-eval's own, from lm_eval/tasks/hellaswag/utils.py. (Not
        # `is`: loading a stock YAML re-executes that file into a new module object, so identity with
        # lm_eval.tasks.hellaswag.utils.process_docs depends on what was loaded first.)
        utils = lm_eval.tasks.hellaswag.utils
        for called in (stock_hellaswag.stock_process_docs, wrapper.__globals__["stock_process_docs"]):
            assert called.__module__ == utils.__name__ == "lm_eval.tasks.hellaswag.utils"
            assert called.__code__.co_filename == stock_fn.__code__.co_filename == utils.__file__
            assert _same(called, stock_fn) and _same(called, utils.process_docs)
    keys = (set(shipped) | set(stock)) - differ
    assert {key for key in keys if not _same(shipped.get(key), stock.get(key))} == set()
    assert shipped["task"] == f"{task}_local" and shipped["metadata"]["stock_task"] == task
    assert shipped["metadata"]["local_file"] == LOCAL_TASKS[task][0]
    split = LOCAL_TASKS[task][1]
    split_key = "test_split" if split == "test" else "validation_split"
    assert shipped[split_key] == stock[split_key] == split
    assert shipped["metadata"]["version"] == stock["metadata"]["version"]
    # pointed at a local file, the stock config keeps only the split that file holds
    swapped = stock_task_config(task, "local.jsonl", split)
    assert swapped["dataset_kwargs"] == {"data_files": {split: "local.jsonl"}}
    assert {key: swapped.get(key) for key in ("training_split", "validation_split", "test_split")} == {
        key: (split if key == split_key else None) for key in ("training_split", "validation_split", "test_split")}


@pytest.mark.shared
@needs_shared
@pytest.mark.parametrize("task", ["piqa", "arc_easy", "arc_challenge", "winogrande"])
def test_local_task_renders_every_row_as_the_stock_task(task):
    pytest.importorskip("lm_eval")
    shipped, stock = _tasks(task)
    assert shipped.OUTPUT_TYPE == stock.OUTPUT_TYPE == "multiple_choice"
    assert list(shipped._metric_fn_list) == list(stock._metric_fn_list)
    assert list(shipped._metric_fn_list) == (["acc"] if task == "winogrande" else ["acc", "acc_norm"])
    assert shipped.aggregation() == stock.aggregation() and shipped.higher_is_better() == stock.higher_is_better()
    assert shipped.config.target_delimiter == stock.config.target_delimiter == " "
    assert shipped.multiple_input == stock.multiple_input
    assert shipped.config.num_fewshot in (None, 0) and stock.config.num_fewshot in (None, 0)

    ours, theirs = list(shipped.eval_docs), list(stock.eval_docs)
    assert len(ours) == len(theirs) == ITEM_COUNTS[task]
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a == b, i
        assert shipped.doc_to_text(a) == stock.doc_to_text(b), i
        choices = shipped.doc_to_choice(a)
        assert choices == stock.doc_to_choice(b), i
        target = shipped.doc_to_target(a)
        assert target == stock.doc_to_target(b), i
        if task != "winogrande":  # there the target is the sentence's tail and the text the gold index
            assert isinstance(target, int) and 0 <= target < len(choices), i


@pytest.mark.shared
@needs_shared
@pytest.mark.parametrize("task", ["piqa", "arc_easy", "arc_challenge", "winogrande"])
def test_local_task_builds_the_stock_requests(task):
    """The (context, continuation) pairs lm-eval sends the model, for the first 300 rows, zero-shot."""
    pytest.importorskip("lm_eval")
    shipped, stock = _tasks(task)
    requests = []
    for t in (shipped, stock):
        t.build_all_requests(limit=300)
        requests.append([(inst.request_type, inst.idx, inst.arguments, inst.doc_id) for inst in t.instances])
    assert requests[0] == requests[1]
    assert {doc_id for *_, doc_id in requests[0]} == set(range(300))
    kind, idx, (context, continuation), doc_id = requests[0][0]
    assert kind == "loglikelihood" and idx == 0 and doc_id == 0 and continuation.startswith(" ")
    if task != "winogrande":
        assert context.startswith("Question: ") and context.endswith("\nAnswer:")


# ----------------------------------------------------------------------------- HellaSwag

# WikiHow rows: their ctx is whole sentences (ends with "."), the hub's ctx_b is "".
# ActivityNet rows: ctx = ctx_a + " " + ctx_b, ctx_b being the lower-case start of the next sentence.
HELLASWAG_WIKIHOW_ROWS = 6799  # 19 WikiHow categories as activity_label
HELLASWAG_ACTIVITYNET_ROWS = 3243  # 173 ActivityNet activities; no label is in both groups
HELLASWAG_LOWER_CTX_B = 3236  # ActivityNet rows whose ctx_b starts lower-case: the stock capitalizes it
HELLASWAG_QUERIES_PREPROCESSED = 2  # WikiHow queries still holding [..] text the stock preprocess drops
HELLASWAG_PROMPTS_CHANGED = HELLASWAG_LOWER_CTX_B + HELLASWAG_QUERIES_PREPROCESSED  # 3238 of 10042
HELLASWAG_CHOICES_PREPROCESSED = 12  # local endings the stock preprocess still changes (12 rows, 1 each)
HELLASWAG_WIKIHOW_INNER_DOT = 7  # WikiHow ctx, lower-case word after an inner ". " ("a.m. to", "u.s. citizens")
HELLASWAG_ODD_CTX_B = 7  # ActivityNet ctx_b starting with a digit or a quote ('2 a guy', '" knife sharpening')
HELLASWAG_MAY_DIFFER_FROM_HUB = 6  # of those 7, the ones with a lower-case letter further on


def hub_layout(row: dict) -> dict:
    """A hub (Rowan/hellaswag) row rebuilt from a local row: ctx split into ctx_a and ctx_b.

    Written independently of stock_hellaswag.split_context (the same rule), which it is checked against.
    """
    ctx = row["ctx"]
    if ctx.endswith("."):
        ctx_a, ctx_b = ctx, ""
    else:
        cut = ctx.rindex(". ") + 1
        ctx_a, ctx_b = ctx[:cut], ctx[cut + 1:]
        assert ctx_a + " " + ctx_b == ctx
    return {"activity_label": row["activity_label"], "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": ctx,
            "endings": row["choices"], "label": str(row["gold"])}


@pytest.fixture(scope="module")
def hellaswag(tmp_path_factory):
    if SHARED is None:
        pytest.skip("needs ../shared/data")
    pytest.importorskip("lm_eval")
    from lm_eval.api.task import ConfigurableTask

    file, split = LOCAL_TASKS["hellaswag"]
    rows = [json.loads(line) for line in (DATA_DIR / file).read_text().splitlines()]
    hub_rows = [hub_layout(row) for row in rows]
    hub_file = tmp_path_factory.mktemp("hellaswag") / "hellaswag_hub_layout.jsonl"
    hub_file.write_text("".join(json.dumps(row) + "\n" for row in hub_rows))
    stock = ConfigurableTask(config=stock_task_config("hellaswag", hub_file, split))
    shipped = build_task("hellaswag", DATA_DIR)
    rendered = [(shipped.doc_to_text(doc), shipped.doc_to_choice(doc), shipped.doc_to_target(doc))
                for doc in shipped.eval_docs]
    return rows, hub_rows, shipped, stock, rendered


@pytest.mark.shared
def test_hellaswag_renders_as_the_stock_task_on_rebuilt_hub_rows(hellaswag):
    """HellaSwag: the shipped task is the stock task on hub rows rebuilt from the local rows.

    The local file (hellaswag_validation.jsonl, 10042 rows) holds `ctx` = ctx_a + " " + ctx_b joined,
    a ready-made `query` = activity_label + ": " + ctx, `choices` and `gold`, but not the hub's
    ctx_a/ctx_b, and the stock prompt is `preprocess(activity_label + ": " + ctx_a + " " +
    ctx_b.capitalize())`. The shipped `process_docs` (stock_hellaswag.py) rebuilds ctx_a/ctx_b
    (`split_context`: a ctx ending with "." is WikiHow, ctx_b = ""; any other is ActivityNet, split
    after its last ". ") and then calls lm-eval's own stock `process_docs`. So, on every row:

    1. Shipped prompt, choices and target are the stock task's on the rebuilt hub rows (this test),
       and the target is the local `gold`.
    2. Relative to scoring the local rows as they are (the earlier shipped config, `{{query}}` and
       `{{gold}}`), the prompt changes on 3238 of 10042 rows: 3236 ActivityNet rows whose ctx_b is
       capitalised ("... on a roof. he" -> "... on a roof. He") and 2 WikiHow rows whose leftover
       [..] text the stock clean-up drops; the endings change on 12 rows (1 ending each, [..] text
       or a double space). See test_hellaswag_differs_from_the_local_rows_as_they_are.
    3. What cannot be checked offline is whether the rebuilt split is the hub's. It matters only
       where the split is ambiguous AND capitalize() would then change something. 7 WikiHow rows
       have a lower-case word after an inner ". " ("10 a.m. to 10 p.m.", "u.s. citizens"); the
       rule keeps them whole (ctx_b = ""), as the hub does for WikiHow (their activity_label is a
       WikiHow category; no label is shared between the two groups), so they render as the local
       query. 7 ActivityNet rows have a ctx_b starting with a digit or a quote ('2 a guy',
       '" knife sharpening', '50'); capitalize() leaves them as they are, but were the hub's ctx_b
       to start at the first word instead, the stock would capitalise it: that could happen on 6
       of them ('50' has no letter). So at most 6 of 10042 prompts (0.06%) may differ from the
       stock prompt on the real hub rows, by one capital letter each.
       See test_hellaswag_split_and_its_ambiguous_rows.
    This assumes the local text is the hub's: ctx = ctx_a + " " + ctx_b and the endings verbatim,
    with the WikiHow markup ([header], [title], [step]) already cleaned, the stock clean-up then
    running on cleaned text (it changes only the 2 prompts and 12 endings above).
    """
    from lm_eval.tasks.hellaswag.utils import process_docs

    rows, _, shipped, stock, rendered = hellaswag
    assert stock.config.process_docs.__name__ == process_docs.__name__
    assert inspect.getsource(stock.config.process_docs) == inspect.getsource(process_docs)
    assert shipped.OUTPUT_TYPE == stock.OUTPUT_TYPE == "multiple_choice"
    assert list(shipped._metric_fn_list) == list(stock._metric_fn_list) == ["acc", "acc_norm"]
    assert shipped.config.target_delimiter == stock.config.target_delimiter == " "
    theirs = list(stock.eval_docs)
    assert len(rendered) == len(theirs) == len(rows) == ITEM_COUNTS["hellaswag"]
    for i, (row, (text, choices, target), doc) in enumerate(zip(rows, rendered, theirs)):
        assert text == stock.doc_to_text(doc), i
        assert choices == stock.doc_to_choice(doc), i
        assert target == stock.doc_to_target(doc), i
        assert target == row["gold"] and len(choices) == 4, i


@pytest.mark.shared
def test_hellaswag_split_and_its_ambiguous_rows(hellaswag):
    from flattengpt.lm_eval_tasks import stock_hellaswag

    rows, hub_rows, _, _, rendered = hellaswag
    assert len(rows) == ITEM_COUNTS["hellaswag"]
    assert all(row["query"] == f"{row['activity_label']}: {row['ctx']}" for row in rows)
    assert all(len(row["choices"]) == 4 and row["gold"] in range(4) for row in rows)
    # the shipped split is the test's own
    assert all(stock_hellaswag.split_context(row["ctx"]) == (hub["ctx_a"], hub["ctx_b"])
               for row, hub in zip(rows, hub_rows))
    wikihow = [i for i, hub in enumerate(hub_rows) if not hub["ctx_b"]]
    activitynet = [i for i, hub in enumerate(hub_rows) if hub["ctx_b"]]
    assert (len(wikihow), len(activitynet)) == (HELLASWAG_WIKIHOW_ROWS, HELLASWAG_ACTIVITYNET_ROWS)
    # the "." rule and the source agree: WikiHow categories and ActivityNet activities never mix
    wikihow_labels = {rows[i]["activity_label"] for i in wikihow}
    activitynet_labels = {rows[i]["activity_label"] for i in activitynet}
    assert (len(wikihow_labels), len(activitynet_labels)) == (19, 173)
    assert wikihow_labels.isdisjoint(activitynet_labels) and "Personal Care and Style" in wikihow_labels
    assert all(". " in rows[i]["ctx"] for i in activitynet)  # every ActivityNet ctx_a is non-empty
    ctx_b = [hub_rows[i]["ctx_b"] for i in activitynet]
    assert all("." not in b for b in ctx_b)  # no ctx_b holds a sentence end
    assert all(b == b.lower() for b in ctx_b)  # capitalize() lowers nothing
    assert sum(b[0].islower() for b in ctx_b) == HELLASWAG_LOWER_CTX_B

    # Ambiguous 1: WikiHow ctx with a lower-case word after an inner ". " (abbreviations). Split
    # there, the stock would capitalise that word; the rule keeps them whole, as the hub's WikiHow
    # rows are (ctx_b ""), so they render as the local query.
    inner = [i for i in wikihow if ". " in rows[i]["ctx"] and rows[i]["ctx"].rpartition(". ")[2][:1].islower()]
    assert len(inner) == HELLASWAG_WIKIHOW_INNER_DOT
    assert any("10 a.m. to 10 p.m." in rows[i]["ctx"] for i in inner)
    assert all(hub_rows[i]["ctx_b"] == "" and rendered[i][0] == rows[i]["query"] for i in inner)

    # Ambiguous 2: ActivityNet ctx_b starting with a digit or a quote. capitalize() keeps them (they
    # render as the local query); a hub ctx_b starting at the first word would be capitalised, which
    # can matter only where a lower-case letter follows.
    odd = [i for i in activitynet if not hub_rows[i]["ctx_b"][0].isalpha()]
    assert len(odd) == HELLASWAG_ODD_CTX_B == HELLASWAG_ACTIVITYNET_ROWS - HELLASWAG_LOWER_CTX_B
    assert {hub_rows[i]["ctx_b"][0] for i in odd} <= set('0123456789"')
    assert all(rendered[i][0] == rows[i]["query"] for i in odd)
    may_differ = [i for i in odd if any(c.isalpha() for c in hub_rows[i]["ctx_b"])]
    assert len(may_differ) == HELLASWAG_MAY_DIFFER_FROM_HUB
    assert sorted(hub_rows[i]["ctx_b"] for i in odd if i not in may_differ) == ["50"]


@pytest.mark.shared
def test_hellaswag_differs_from_the_local_rows_as_they_are(hellaswag):
    """What the rebuild changes against scoring `query`/`choices` as stored (3238 prompts, 12 endings)."""
    from lm_eval.tasks.hellaswag.utils import preprocess

    rows, hub_rows, _, _, rendered = hellaswag
    text_differs = capitalized = preprocessed = choice_rows = choices_changed = 0
    for i, (row, hub, (text, choices, _)) in enumerate(zip(rows, hub_rows, rendered)):
        query = row["query"]
        # the local query with ctx_b's first letter capitalised ...
        fixed = query
        if hub["ctx_b"]:
            at = len(hub["activity_label"]) + 2 + len(hub["ctx_a"]) + 1
            assert query[at:] == hub["ctx_b"], i
            fixed = query[:at] + query[at].upper() + query[at + 1:]
        # ... is the shipped prompt, up to the stock preprocess's removal of leftover [..] text
        assert text == preprocess(fixed), i
        assert text.lower() == query.lower() or preprocess(fixed) != fixed, i
        text_differs += text != query
        capitalized += fixed != query
        preprocessed += preprocess(fixed) != fixed
        assert choices == [preprocess(choice) for choice in row["choices"]], i
        choice_rows += choices != row["choices"]
        choices_changed += sum(x != y for x, y in zip(choices, row["choices"]))

    assert capitalized == HELLASWAG_LOWER_CTX_B
    assert preprocessed == HELLASWAG_QUERIES_PREPROCESSED
    assert text_differs == HELLASWAG_PROMPTS_CHANGED == 3238
    assert choice_rows == choices_changed == HELLASWAG_CHOICES_PREPROCESSED


# ----------------------------------------------------------------------------- end to end on a real model


def direct_scores(model_dir, rows):
    """acc and acc_norm of the stock ARC prompt, scored with the HF model directly as lm-eval scores it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    max_length = model.config.max_position_embeddings
    correct = correct_norm = 0
    for row in rows:
        context = f"Question: {row['question']}\nAnswer:"
        choices = row["choices"]["text"]
        gold = row["choices"]["label"].index(row["answerKey"])
        lls = []
        for choice in choices:
            continuation = " " + choice  # target_delimiter " "
            # lm-eval (causal): encode the whole string and the context; the continuation is the tail
            whole = tokenizer.encode(context + continuation)
            context_ids = tokenizer.encode(context)
            continuation_ids = whole[len(context_ids):]
            inputs = (context_ids + continuation_ids)[-(max_length + 1):][:-1]
            with torch.no_grad():
                logprobs = model(torch.tensor([inputs])).logits[0].float().log_softmax(-1)
            tail = logprobs[-len(continuation_ids):]
            lls.append(tail.gather(1, torch.tensor(continuation_ids)[:, None]).sum().item())
        correct += max(range(len(lls)), key=lambda i: (lls[i], -i)) == gold
        normed = [ll / len(choice) for ll, choice in zip(lls, choices)]  # acc_norm: per character
        correct_norm += max(range(len(normed)), key=lambda i: (normed[i], -i)) == gold
    return correct / len(rows), correct_norm / len(rows)


def _check_record(record, task, metric):
    assert record["task"] == task and record["lm_eval_task"] == f"{task}_local"
    assert record["source"] == "local"
    assert record["data_file"] == str((DATA_DIR / LOCAL_TASKS[task][0]).resolve())
    assert record["metric"] == metric
    assert 0.0 <= record["value"] <= 1.0 and record["value"] == record["metrics"][metric]
    assert math.isfinite(record["stderr"]) and record["stderr"] >= 0
    assert record["n_samples"]["effective"] == 8 and record["n_samples"]["original"] == ITEM_COUNTS[task]
    assert record["lm_eval_version"] == zero_shot.LM_EVAL_VERSION == "0.4.13"
    assert record["limit"] == 8 and record["num_fewshot"] == 0
    json.dumps(record)  # JSON-able


@pytest.mark.shared
@needs_shared
def test_arc_easy_end_to_end_matches_direct_scoring(one_thread):
    pytest.importorskip("lm_eval")
    record = zero_shot.evaluate_task(STORIES, "arc_easy", data_dir=DATA_DIR, limit=8, batch_size=8)
    _check_record(record, "arc_easy", "acc_norm")
    assert set(record["metrics"]) >= {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    rows = [json.loads(line) for line in (DATA_DIR / "arc_easy_test.jsonl").read_text().splitlines()[:8]]
    acc, acc_norm = direct_scores(STORIES, rows)
    assert record["metrics"]["acc"] == pytest.approx(acc)
    assert record["metrics"]["acc_norm"] == pytest.approx(acc_norm)


@pytest.mark.shared
@needs_shared
def test_winogrande_end_to_end(one_thread):
    pytest.importorskip("lm_eval")
    record = zero_shot.evaluate_task(STORIES, "winogrande", data_dir=DATA_DIR, limit=8, batch_size=8)
    _check_record(record, "winogrande", "acc")
    assert "acc_norm" not in record["metrics"]


@pytest.mark.shared
@needs_shared
def test_resume_cache_reuses_scored_requests(one_thread, tmp_path):
    """A run that stopped after some items resumes from the JSON request cache with the same result."""
    pytest.importorskip("lm_eval")
    import json

    cache = tmp_path / "resume" / "arc_easy"
    cache.parent.mkdir()
    zero_shot.evaluate_task(STORIES, "arc_easy", data_dir=DATA_DIR, limit=4, batch_size=8, resume_cache=cache)
    store = tmp_path / "resume" / "arc_easy_rank0.jsonl"
    records = [json.loads(line) for line in store.read_text().splitlines()]
    # the first four items' requests are on disk, as plain JSON: one loglikelihood pair per choice
    assert len(records) >= 8 and all(len(r["value"]) == 2 for r in records)
    assert not list(tmp_path.rglob("*.db")), "lm-eval's pickling SQLite store is never written"
    # a SQLite file where lm-eval's store would be is never opened (it could hold anyone's pickles)
    (tmp_path / "resume" / "arc_easy_rank0.db").write_bytes(b"not a database")
    resumed = zero_shot.evaluate_task(STORIES, "arc_easy", data_dir=DATA_DIR, limit=8, batch_size=8,
                                      resume_cache=cache)
    fresh = zero_shot.evaluate_task(STORIES, "arc_easy", data_dir=DATA_DIR, limit=8, batch_size=8)
    assert resumed["metrics"] == fresh["metrics"]
    assert len(store.read_text().splitlines()) == len({json.loads(line)["key"] for line in
                                                       store.read_text().splitlines()}), "one line per request"


@pytest.mark.shared
@needs_shared
def test_stage_removes_its_resume_cache(one_thread, tmp_path):
    from flattengpt.provenance import read_json, write_json
    from flattengpt.stages import zero_shot_stage

    write_json(tmp_path / "model.json", {"path": str(STORIES), "fingerprint": "stories"})
    out = tmp_path / "dense" / "eval" / "zero_shot" / "winogrande.json"
    options = {"data_dir": str(DATA_DIR), "limit": 4, "num_fewshot": 0, "batch_size": 8}
    zero_shot_stage(tmp_path / "model.json", None, "winogrande", options, {"device": "cpu", "dtype": "float32"},
                    out, {"rule": "zero_shot"})
    record = read_json(out)
    assert record["metric"] == "acc" and record["provenance"]["inputs"]["data_file_sha256"]
    assert not list((tmp_path / "dense" / "eval" / ".resume").glob("zero_shot.winogrande.*")), \
        "a finished task leaves no resume state behind"
