"""The `eval:` section."""

from __future__ import annotations

from pydantic import Field

from ..schema import Section


class EvalConfig(Section):
    """Evaluation settings: batch size, the K of recall@K, queries in the retrieval grid plot."""

    batch_size: int = Field(256, ge=1)
    recall_at: tuple[int, ...] = (1, 5, 10)
    grid_queries: int = Field(4, ge=0, le=32)
    # a unified run generates for every evaluated row: at most this many held-out rows
    max_rows: int = Field(200, ge=1)
    # two-tower runs on the synthetic world: also evaluate on the split with paraphrased captions and
    # zero-shot prompts (words the training captions never use; mmfusion.eval.paraphrase), keys "para_*"
    paraphrase: bool = False


__all__ = ["EvalConfig"]
