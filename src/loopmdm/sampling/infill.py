"""Greedy decoding orders for filling the blanks of a task (Sudoku cells, k-hop answers).

Each order commits argmax tokens, so a result depends only on the model and S:
* ``oneshot``    -- every blank from one denoiser call (all deduction inside one call);
* ``raster``     -- one blank per call, in row-major order (the paper's restricted order:
                    the next cell is forced, however hard it is);
* ``confidence`` -- one blank per call, the one whose top probability is highest
                    (easy-first, Kim et al. 2025; free order). With `block_len`, LLaDA's
                    semi-autoregressive decoding: the blanks are cut into blocks of
                    `block_len` from each row's first blank, blocks are filled left to right,
                    easy-first within the current block (long answers).
The denoiser has the samplers' signature `denoiser(x, num_loops, t) -> logits (B, L, V)`;
`t` is the fraction of blanks still masked in each row (what a time-conditioned model was
trained to see under the log-linear schedule). `num_symbols` restricts predictions to the
first ids (a task's symbols; EOS and pad are never proposed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loopmdm.errors import require

ORDERS = ("oneshot", "raster", "confidence")


@dataclass
class InfillResult:
    tokens: torch.Tensor  # (B, L) with every blank filled
    nfe: int  # denoiser calls


@torch.no_grad()
def fill_blanks(denoiser, x: torch.Tensor, mask_id: int, order: str, num_loops: int,
                num_symbols: int | None = None, block_len: int = 0) -> InfillResult:
    require(order in ORDERS, f"order '{order}' is not allowed; choose one of: {', '.join(ORDERS)}")
    require(block_len >= 0 and (block_len == 0 or order == "confidence"),
            f"block length {block_len} must be >= 0, and blocks go with order 'confidence' (got '{order}')")
    x = x.clone()
    L = x.shape[1]
    first_blank = torch.where((x == mask_id).any(1), (x == mask_id).int().argmax(1), torch.zeros_like(x[:, 0]))
    block_of = (torch.arange(L, device=x.device)[None, :] - first_blank[:, None]).clamp(min=0) // max(block_len, 1)
    blanks0 = (x == mask_id).sum(1).clamp(min=1).float()
    nfe = 0
    rows = torch.arange(x.shape[0], device=x.device)
    while True:
        masked = x == mask_id
        if not masked.any():
            return InfillResult(x, nfe)
        t = masked.sum(1).float() / blanks0
        logits = denoiser(x, num_loops, t).float()
        if num_symbols is not None:
            logits = logits[..., :num_symbols]
        nfe += 1
        probs, best = logits.softmax(-1).max(-1)  # (B, L)
        if order == "oneshot":
            x = torch.where(masked, best, x)
            continue
        if order == "raster":  # the first blank of each row
            pos = masked.float().argmax(1)
        else:  # the most confident blank of each row (of its current block, with blocks)
            allowed = masked
            if block_len:
                current = torch.where(masked, block_of, torch.full_like(block_of, L)).min(1, keepdim=True).values
                allowed = masked & (block_of == current)
            pos = torch.where(allowed, probs, torch.full_like(probs, -1.0)).argmax(1)
        active = masked.any(1)
        fill = torch.where(active, best[rows, pos], x[rows, pos])
        x[rows, pos] = fill
