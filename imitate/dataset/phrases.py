"""The versioned data of `imitate curate` (`prompts/curation.yaml`): refusal/disclaimer phrases and the generic
system message of prompt erasure, each with an id, a version and a sha256 that is checked on load.

    load_curation()            -> Curation(phrases=PhraseList, generic_system=GenericSystem), hashes checked
    read_extra_phrases(path)   a user's own list: YAML {refusals: [...], disclaimers: [...]} or one phrase a line
    PhraseMatcher(refusals, disclaimers, window).find(text) -> the phrase found, or None

`PhraseList.sha256` is the sha256 of the canonical JSON `{"disclaimers": [...], "refusals": [...]}`; the generic
system message's is the sha256 of its text (as for the system messages in prompts/system/). The folder is the one
`imitate.prompts.default_prompts_dir()` names (`IMITATE_PROMPTS_DIR` overrides it).
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from imitate.errors import ConfigError
from imitate.prompts import default_prompts_dir, load_model, read_yaml
from imitate.records import canonical_json, sha256_text

CURATION_FILE = "curation.yaml"
_HEX64 = r"^[0-9a-f]{64}$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PhraseList(_Model):
    id: str
    version: int = Field(ge=1)
    description: str
    sha256: str = Field(pattern=_HEX64)
    refusals: list[str]
    disclaimers: list[str]

    def content_sha256(self) -> str:
        return phrases_sha256(self.refusals, self.disclaimers)


class GenericSystem(_Model):
    id: str
    version: int = Field(ge=1)
    description: str
    sha256: str = Field(pattern=_HEX64)
    text: str


class Curation(_Model):
    version: int = Field(ge=1)
    phrases: PhraseList
    generic_system: GenericSystem


def phrases_sha256(refusals: list[str], disclaimers: list[str]) -> str:
    return sha256_text(canonical_json({"disclaimers": disclaimers, "refusals": refusals}))


def load_curation(dir: Path | str | None = None) -> Curation:
    """Load `curation.yaml` from the prompts folder; ConfigError lists every problem (shape, hashes) at once."""
    path = Path(dir if dir is not None else default_prompts_dir()) / CURATION_FILE
    curation = load_model(path, Curation)
    problems = []
    if curation.phrases.content_sha256() != curation.phrases.sha256:
        problems.append(f"phrases.sha256 does not match the lists (they hash to {curation.phrases.content_sha256()})")
    if sha256_text(curation.generic_system.text) != curation.generic_system.sha256:
        got = sha256_text(curation.generic_system.text)
        problems.append(f"generic_system.sha256 does not match its text (it hashes to {got})")
    if problems:
        raise ConfigError(f"{path}: edited without a new hash", problems=problems, hint="bump version and sha256")
    return curation


def read_extra_phrases(path: Path | str) -> tuple[list[str], list[str]]:
    """(refusals, disclaimers) from a user's file: YAML with `refusals`/`disclaimers` lists, or plain text with
    one phrase a line (disclaimers: matched anywhere; blank lines and lines starting with # are skipped)."""
    path = Path(path)
    if path.suffix.lower() in (".yaml", ".yml"):
        data = read_yaml(path)
        if not isinstance(data, dict) or set(data) - {"refusals", "disclaimers"}:
            raise ConfigError(f"{path}: expected a mapping with `refusals` and/or `disclaimers` lists")
        lists = [data.get(k) or [] for k in ("refusals", "disclaimers")]
        if not all(isinstance(x, list) and all(isinstance(p, str) for p in x) for x in lists):
            raise ConfigError(f"{path}: `refusals` and `disclaimers` must be lists of strings")
        return lists[0], lists[1]
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text") from exc
    return [], [s for line in lines if (s := line.strip()) and not s.startswith("#")]


_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})
_SPACES = re.compile(r"\s+")


def fold(text: str) -> str:
    """The form phrases are matched in: case-folded, curly apostrophes straightened, whitespace collapsed."""
    return _SPACES.sub(" ", text.translate(_APOSTROPHES).casefold())


def _alternation(phrases: list[str]) -> re.Pattern | None:
    folded = sorted({fold(p).strip() for p in phrases} - {""}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, folded))) if folded else None


class PhraseMatcher:
    """One regex per kind: refusals looked for in the first `window` characters, disclaimers anywhere."""

    def __init__(self, refusals: list[str], disclaimers: list[str], window: int = 300):
        self._refusal, self._disclaimer, self.window = _alternation(refusals), _alternation(disclaimers), window

    def find(self, text: str) -> tuple[str, str] | None:
        """("refusal" | "disclaimer", the phrase) for the first match, or None."""
        folded = fold(text)
        if self._refusal and (m := self._refusal.search(folded, 0, self.window)):
            return "refusal", m.group(0)
        if self._disclaimer and (m := self._disclaimer.search(folded)):
            return "disclaimer", m.group(0)
        return None
