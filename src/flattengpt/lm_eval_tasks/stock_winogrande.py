"""WinoGrande's partial-evaluation functions, taken from lm-eval's own stock task unchanged."""

from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_choice, doc_to_target, doc_to_text

__all__ = ["doc_to_choice", "doc_to_target", "doc_to_text"]
