"""The `curate:` section of imitate's config (defaults < YAML file < --set < command-line flags), validated with
unknown keys forbidden. Kept free of heavy imports: `imitate/config.py` imports it for every command.

    curate:
      gates:      which gates run and their thresholds (imitate/dataset/gates.py, in the order listed there)
      select:     LIMA-style top-k under a diversity cap (imitate/dataset/select.py); off unless k is set
      erase_system: null | generic | none      prompt erasure (Orca 2), applied to the rows kept
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

TextField = Literal["conversation", "question", "response"]


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class NearDupConfig(_Cfg):
    """MinHash + LSH near-duplicates (datasketch): Jaccard `threshold` of the shingle sets, `num_perm` MinHash
    permutations, `shingle` words (or characters with unit: char) per shingle."""

    enabled: bool = True
    threshold: float = Field(0.8, gt=0.0, lt=1.0)
    num_perm: int = Field(128, ge=16, le=1024)
    shingle: int = Field(5, ge=1, le=64)
    unit: Literal["word", "char"] = "word"
    field: TextField = "conversation"


class GateConfig(_Cfg):
    failed: bool = Field(True, description="drop rows whose request failed (status failed)")
    truncated: bool = Field(True, description="drop answers cut by the token limit (finish_reason=length)")
    refusal: bool = Field(True, description="drop refusals and AI disclaimers (prompts/curation.yaml phrases)")
    phrases_file: str | None = Field(None, description="more phrases: YAML {refusals, disclaimers} or one a line")
    extra_phrases: list[str] = Field(default_factory=list, description="more disclaimers, matched anywhere")
    refusal_window: int = Field(300, ge=1, description="refusal phrases count within this many leading characters")
    min_words: int = Field(1, ge=0, description="answers with fewer words are dropped (0 keeps empty answers)")
    min_steps: int = Field(0, ge=0, description="answers with fewer reasoning steps (numbered/bulleted) are dropped")
    max_tokens: int | None = Field(None, ge=1, description="whole conversation, counted with `tokenizer`")
    tokenizer: str | None = Field(None, description="tokenizer.json of the student (or its model folder)")
    max_words: int | None = Field(None, ge=1, description="whole conversation, when no tokenizer is given")
    exact_dedup: bool = Field(True, description="drop rows whose normalised text repeats an earlier kept row")
    exact_field: TextField = "conversation"
    near_dup: NearDupConfig = Field(default_factory=NearDupConfig)
    max_rouge: float | None = Field(
        None, gt=0.0, le=1.0, description="drop questions with ROUGE-L above this against an earlier kept one (0.7)"
    )
    languages: list[str] = Field(default_factory=list, description="keep only these ISO 639-1 codes (empty: all)")
    min_language_confidence: float = Field(0.5, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _tokens_need_a_tokenizer(self) -> GateConfig:
        if self.max_tokens is not None and self.tokenizer is None:
            raise ValueError("max_tokens counts with the student's tokenizer: set tokenizer (or use max_words)")
        return self


class SelectConfig(_Cfg):
    """LIMA-style selection: keep the `k` best-scoring rows, at most `per_cluster` from one near-duplicate cluster
    or `per_collection` from one Query.collection. `score` is `heuristic` or the name of a numeric field of
    Record.scores (a judge's score, say); rows without that field are dropped."""

    k: int | None = Field(None, ge=1)
    score: str = "heuristic"
    per_cluster: int | None = Field(None, ge=1)
    per_collection: int | None = Field(None, ge=1)
    length_weight: float = Field(1.0, ge=0.0)
    structure_weight: float = Field(1.0, ge=0.0)
    steps_weight: float = Field(1.0, ge=0.0)

    @model_validator(mode="after")
    def _one_cap(self) -> SelectConfig:
        if self.per_cluster is not None and self.per_collection is not None:
            raise ValueError(
                "set per_cluster or per_collection, not both: a top-k in bounded memory can honour one cap exactly"
            )
        if self.k is None and (self.per_cluster is not None or self.per_collection is not None):
            raise ValueError("a diversity cap needs k (the number of rows to select)")
        return self


class CurateConfig(_Cfg):
    gates: GateConfig = Field(default_factory=GateConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    erase_system: Literal["generic", "none"] | None = Field(
        None, description="replace the system message in kept rows by the generic one, or remove it"
    )
