"""A zero-shot resume cache of plain JSON lines, in place of lm-eval's pickling SQLite store.

lm-eval's `CachingLM` (the `use_cache` of `simple_evaluate`) keeps every scored request in a
`sqlitedict.SqliteDict`, which pickles what it writes and unpickles what it reads. A resume cache
lives in the results tree, so resuming on a tree someone else wrote would run their pickles.
`JsonRequestStore` is the same mapping (request hash -> result) as a JSON Lines file: one
`{"key": ..., "value": ...}` object per scored request, appended and flushed as lm-eval reports
it, never unpickled. `json_request_cache()` makes lm-eval's `CachingLM` open this store instead of
SQLite for the duration of one evaluation, so the rest of lm-eval's caching logic (hashing of the
request arguments, the partial-result hook, "Cached requests: N" in the log) is unchanged.

Results are loglikelihood pairs (float, bool), rolling loglikelihoods (float) and generated
strings; JSON keeps them exactly (floats round-trip, lists come back as tuples). A line cut short
by a kill is the last one of the file and is dropped on load; any other unreadable line is an
error naming the file and line.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

SUFFIX = ".jsonl"


def _restore(value: Any) -> Any:
    return tuple(_restore(v) for v in value) if isinstance(value, list) else value


class JsonRequestStore:
    """The dict-like part of SqliteDict that lm-eval's CachingLM uses, backed by a JSON Lines file."""

    def __init__(self, filename: str | os.PathLike, *args, **kwargs):  # SqliteDict's signature; options unused
        path = Path(filename)
        self.path = path.with_suffix(SUFFIX) if path.suffix != SUFFIX else path
        self.entries: dict[str, Any] = {}
        if self.path.is_file():
            self._load()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def _load(self) -> None:
        text = self.path.read_text(encoding="utf-8")
        lines = text.split("\n")
        complete = text.endswith("\n")
        for number, line in enumerate(lines, start=1):
            if not line:
                continue
            try:
                record = json.loads(line)
                key, value = record["key"], record["value"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                if number == len(lines) and not complete:
                    break  # the last line, cut short by a kill: that request is scored again
                raise ValueError(f"{self.path}, line {number}: not a request-cache record ({error}); delete the "
                                 "file to score its task from the start") from None
            self.entries[key] = _restore(value)
        if not complete and text:
            # drop the partial line, so that the next append starts on a line of its own
            with open(self.path, "w", encoding="utf-8") as out:
                out.writelines(json.dumps({"key": k, "value": v}) + "\n" for k, v in self.entries.items())

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __getitem__(self, key: str) -> Any:
        return self.entries[key]

    def __setitem__(self, key: str, value: Any) -> None:
        value = _restore(value)
        if self.entries.get(key, object()) == value:
            return  # lm-eval stores each result twice (its partial hook, then the batch): one line is enough
        self.entries[key] = value
        self._file.write(json.dumps({"key": key, "value": value}) + "\n")
        self._file.flush()

    def __len__(self) -> int:
        return len(self.entries)

    def commit(self, blocking: bool = True) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self, *args, **kwargs) -> None:
        if not self._file.closed:
            self.commit()
            self._file.close()


@contextlib.contextmanager
def json_request_cache() -> Iterator[None]:
    """While active, lm-eval's CachingLM stores requests in JsonRequestStore files (`<use_cache>_rank0.jsonl`)."""
    import sqlitedict

    original = sqlitedict.SqliteDict
    sqlitedict.SqliteDict = JsonRequestStore  # CachingLM imports it from the module when it is built
    try:
        yield
    finally:
        sqlitedict.SqliteDict = original
