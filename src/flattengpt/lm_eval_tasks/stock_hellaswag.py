"""HellaSwag from the local JSONL through lm-eval's own stock `process_docs`.

The local rows (shared/data/tasks/lm_eval_jsonl) hold `ctx` = ctx_a + " " + ctx_b joined, not
the two halves, so the stock prompt's `ctx_b.capitalize()` cannot be applied directly. The hub
layout is rebuilt first: a WikiHow context ends with "." and has an empty ctx_b; an ActivityNet
context is split after its last ". " (ctx_a always ends a sentence, ctx_b is the lower-case
start of the next one). Then the stock function builds query, choices and gold exactly as it
does from the hub. tests/test_zero_shot.py counts the rows this changes and the few it cannot
rebuild with certainty.
"""

from lm_eval.tasks.hellaswag.utils import process_docs as stock_process_docs


def split_context(ctx: str) -> tuple[str, str]:
    """(ctx_a, ctx_b) of a joined HellaSwag context, as the hub dataset stores them."""
    if ctx.endswith("."):
        return ctx, ""
    ctx_a, sep, ctx_b = ctx.rpartition(". ")
    if not sep:
        return "", ctx
    return ctx_a + ".", ctx_b


def to_hub_layout(doc: dict) -> dict:
    ctx_a, ctx_b = split_context(doc["ctx"])
    return {"ctx_a": ctx_a, "ctx_b": ctx_b, "endings": doc["choices"], "label": str(doc["gold"])}


def process_docs(dataset):
    return stock_process_docs(dataset.map(to_hub_layout))
