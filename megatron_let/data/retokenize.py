"""A target's tokens read in a teacher's tokenization (LET with a teacher tokenizer ≠ the
target's: the LET paper's LET†).

For each sample of target token ids:

1. its text, with the character span of every target token: decoded incrementally (each token's
   new characters are the difference between decoding a short window with and without it; bytes
   that do not complete a character yet wait for the token that completes them). EOD tokens are
   document separators, not text: they add no characters. Checked against decoding the whole
   sample; a tokenizer whose decoding is not incremental falls back to decoding every prefix.
2. the teacher's tokens of that text, with their character spans (no special tokens added),
   truncated to the teacher's ``max_length`` positions;
3. the mapping: target position i (its text ends at character e_i) takes the state of the last
   teacher token that ends at or before e_i — the latest teacher state that has read no text the
   target has not read yet (causal on both sides). A target position with no such teacher token
   (e.g. before the first one is complete, or past the teacher's truncation) is masked out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_let.data.preprocess import Tokenizer

logger = logging.getLogger(__name__)


def token_ends(tokenizer: Tokenizer, ids: list[int], eod: Optional[int] = None) -> tuple[str, list[int]]:
    """(the text of ``ids``, the character offset where each token's text ends)."""
    kept = [i for i in ids if i != eod]
    pieces: list[str] = []
    window_start, read = 0, 0  # [window_start, read): decoded context; tokens from read on: not yet emitted
    for position in range(len(kept)):
        context = tokenizer.detokenize(kept[window_start:read])
        text = tokenizer.detokenize(kept[window_start : position + 1])
        if len(text) > len(context) and text.startswith(context) and not text.endswith("\ufffd"):
            pieces.append(text[len(context) :])
            window_start, read = read, position + 1
        else:
            pieces.append("")  # an incomplete character: its bytes go with the token that completes it
    text = "".join(pieces)
    if text != tokenizer.detokenize(kept):
        logger.warning("%s: decoding is not incremental; decoding every prefix instead (slow)", tokenizer.name)
        ends_kept = [len(tokenizer.detokenize(kept[: i + 1])) for i in range(len(kept))]
        text = tokenizer.detokenize(kept)
    else:
        ends_kept, length = [], 0
        for piece in pieces:
            length += len(piece)
            ends_kept.append(length)
    ends, k, length = [], 0, 0
    for token in ids:
        if token != eod:
            length = ends_kept[k]
            k += 1
        ends.append(length)
    return text, ends


def last_ending_before(target_ends: list[int], teacher_spans: list[tuple[int, int]]) -> list[int]:
    """For each target end e_i, the index of the last teacher token whose span ends at or before
    e_i (−1 when none). Teacher spans are in text order."""
    chosen, j = [], -1
    for end in target_ends:
        while j + 1 < len(teacher_spans) and teacher_spans[j + 1][1] <= end:
            j += 1
        chosen.append(j)
    return chosen


@dataclass
class TeacherView:
    """A microbatch as the teacher reads it, and where its states go."""

    tokens: torch.Tensor  # [b, L] teacher ids (padded at the end)
    position_ids: torch.Tensor  # [b, L]
    source: torch.Tensor  # [b, s] the teacher position whose state target position i takes (0 if masked)
    valid: torch.Tensor  # [b, s] bool: target positions that have a teacher state

    def gather(self, teacher_states: torch.Tensor) -> torch.Tensor:
        """Teacher states [L, b, d] → [s, b, d] at the target's positions (zeros where masked)."""
        index = self.source.t().unsqueeze(-1).expand(-1, -1, teacher_states.shape[-1])
        states = torch.gather(teacher_states, 0, index.to(teacher_states.device))
        return states * self.valid.t().unsqueeze(-1).to(states.device, states.dtype)


class Retokenizer:
    """Target token ids → :class:`TeacherView` (see the module docstring for the rule)."""

    def __init__(self, target: Tokenizer, teacher: Tokenizer, max_length: int, target_eod: Optional[int] = None):
        self.target, self.teacher = target, teacher
        self.max_length = max_length
        self.target_eod = target_eod
        self.pad = teacher.eod if teacher.eod is not None else 0  # after each sample's end: never read

    def __call__(self, tokens: torch.Tensor) -> TeacherView:
        rows, sources, valid = [], [], []
        for sample in tokens.tolist():
            text, ends = token_ends(self.target, sample, self.target_eod)
            teacher_ids, spans = self.teacher.tokenize_with_offsets(text)
            chosen = last_ending_before(ends, spans)
            rows.append(teacher_ids[: self.max_length])
            sources.append([max(j, 0) if j < self.max_length else 0 for j in chosen])
            valid.append([0 <= j < self.max_length for j in chosen])
        length = max(1, max(len(row) for row in rows))
        padded = [row + [self.pad] * (length - len(row)) for row in rows]
        device = tokens.device
        return TeacherView(
            tokens=torch.tensor(padded, dtype=torch.int64, device=device),
            position_ids=torch.arange(length, device=device).unsqueeze(0).expand(len(rows), -1),
            source=torch.tensor(sources, dtype=torch.int64, device=device),
            valid=torch.tensor(valid, dtype=torch.bool, device=device),
        )
