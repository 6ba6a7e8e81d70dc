"""The zero-shot resume cache: JSON lines, exact round trip, a cut last line dropped, never a pickle."""

import math

import pytest

from flattengpt.request_cache import JsonRequestStore, json_request_cache


def test_round_trip_and_reload(tmp_path):
    store = JsonRequestStore(tmp_path / "cache_rank0.db")  # lm-eval's name: the store writes .jsonl beside it
    assert store.path == tmp_path / "cache_rank0.jsonl"
    values = {"a": (-1.2345678901234567, True), "b": -math.inf, "c": "generated text", "d": (0.0, False)}
    for key, value in values.items():
        store[key] = value
    store["a"] = values["a"]  # lm-eval stores every result twice
    store.commit()
    assert len(store.path.read_text().splitlines()) == 4
    again = JsonRequestStore(tmp_path / "cache_rank0.db")
    assert {k: again[k] for k in values} == values and "e" not in again
    assert not (tmp_path / "cache_rank0.db").exists()


def test_a_line_cut_by_a_kill_is_dropped_and_any_other_bad_line_is_named(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"key": "a", "value": [1.5, true]}\n{"key": "b", "val')
    store = JsonRequestStore(path)
    assert "a" in store and "b" not in store
    store["b"] = (2.5, False)  # appended on a line of its own
    assert JsonRequestStore(path)["b"] == (2.5, False)
    path.write_text('{"key": "a", "value": 1}\nnot json\n{"key": "b", "value": 2}\n')
    with pytest.raises(ValueError, match=r"c\.jsonl, line 2"):
        JsonRequestStore(path)


def test_lm_eval_caching_lm_uses_the_json_store_only_inside_the_context(tmp_path):
    pytest.importorskip("lm_eval")
    import sqlitedict
    from lm_eval.api.model import CachingLM

    class Tiny:
        def set_cache_hook(self, hook):
            self.hook = hook

    original = sqlitedict.SqliteDict
    with json_request_cache():
        caching = CachingLM(Tiny(), str(tmp_path / "x_rank0.db"))
    assert isinstance(caching.dbdict, JsonRequestStore) and sqlitedict.SqliteDict is original
    caching.lm.hook.add_partial("loglikelihood", ("context", " continuation"), (-3.25, False))
    reloaded = JsonRequestStore(tmp_path / "x_rank0.jsonl")
    assert list(reloaded.entries.values()) == [(-3.25, False)]
