"""Language detection for the language filters (`imitate import sharegpt --lang`, `imitate curate`'s language gate).

A thin wrapper over py3langid (langid.py's model, 97 languages, ISO 639-1 codes), whose model ships inside its
wheel: nothing is downloaded at run time. The model takes ~0.8 s to load, so it is loaded once, on first use,
never at import time. Confidences are normalised probabilities (0..1); very short texts ("hi", "ok") score low
whatever they are, so callers decide with a minimum confidence instead of trusting every label.
"""

from __future__ import annotations

import functools
import threading

UNDETERMINED = "und"  # ISO 639-2 "undetermined": text with nothing to judge by (empty, digits, punctuation)

_lock = threading.Lock()


@functools.cache
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def _loaded():
    with _lock:  # two threads asking first would otherwise both spend the load
        return _identifier()


def detect(text: str) -> tuple[str, float]:
    """The most likely language of `text` and its probability; ("und", 0.0) when the text has no letters."""
    if not any(ch.isalpha() for ch in text):
        return UNDETERMINED, 0.0
    lang, confidence = _loaded().classify(text)
    return str(lang), float(confidence)


def parse_languages(spec: str | None) -> frozenset[str]:
    """ "en, de" -> {"en", "de"}; empty or None -> no filter (an empty set)."""
    if not spec:
        return frozenset()
    return frozenset(code.strip().lower() for code in spec.split(",") if code.strip())
