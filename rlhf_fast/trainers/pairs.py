"""DPO's stacked batches: each record's chosen and rejected sequences (its token ids,
`rlhf_fast.trainers.data.tokenized_pairs`) right-padded into one batch, with the masks of
their answer tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PairBatch:
    """A stacked batch: rows [0, B) are prompt+chosen, rows [B, 2B) prompt+rejected.

    input_ids, attention_mask: [2B, L] (right-padded); answer_mask: [2B, L-1], 1 where
    the next-token label is an answer token; rows: the records' dataset indices [B].
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    answer_mask: torch.Tensor
    rows: torch.Tensor

    @property
    def num_tokens(self) -> torch.Tensor:
        """The batch's tokens, a 0-d tensor on its device (read back at logging only)."""
        return self.attention_mask.sum()


def collate_pairs(pairs: list[dict[str, list[int]]], rows: list[int], pad_id: int,
                  device: torch.device) -> PairBatch:
    """Stack chosen then rejected sequences, right-padded, with their answer masks."""
    sequences = [p["prompt"] + p[key] for key in ("chosen", "rejected") for p in pairs]
    prompt_lengths = [len(p["prompt"]) for _ in range(2) for p in pairs]
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    answer_mask = torch.zeros((len(sequences), width - 1), dtype=torch.float32)
    for row, (sequence, prompt_length) in enumerate(zip(sequences, prompt_lengths)):
        input_ids[row, :len(sequence)] = torch.tensor(sequence)
        attention_mask[row, :len(sequence)] = 1
        # label t is token t + 1: answer tokens sit at [prompt_length, len(sequence))
        answer_mask[row, prompt_length - 1:len(sequence) - 1] = 1
    return PairBatch(input_ids.to(device), attention_mask.to(device), answer_mask.to(device),
                     torch.tensor(rows))
