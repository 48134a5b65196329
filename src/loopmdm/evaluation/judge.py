"""Generative perplexity without the network: an autoregressive judge trained here.

MDLM, SEDD and the LoopMDM paper score unconditional samples by the perplexity a separate
autoregressive LM (GPT-2 large) assigns to them. Offline we train the judge ourselves: the
same transformer code with causal attention (model.causal=true, `loopmdm train`) and the
next-token loss below, on the same corpus and tokenizer as the diffusion model, so samples
are scored token for token without re-tokenising. Low-entropy samples (repetitions) flatter
any judge, so the unigram entropy of the samples is always reported beside it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from loopmdm.diffusion.objective import LossOutput
from loopmdm.errors import require


def ar_loss(model, x0: torch.Tensor, valid: torch.Tensor | None = None, **_) -> LossOutput:
    """Mean next-token NLL of x0 (B, L) under a causal model: position i predicts token i+1.
    Pads (valid = False) are hidden as keys and never scored. The same LossOutput as
    `diffusion_loss`, so training and validation take either objective."""
    logits = model(x0, num_loops=1, key_mask=valid)
    B, L, V = logits.shape
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, V), x0[:, 1:].reshape(-1), reduction="none").view(B, L - 1)
    scored = torch.ones_like(nll, dtype=torch.bool) if valid is None else valid[:, 1:] & valid[:, :-1]
    nll = torch.where(scored, nll, torch.zeros_like(nll))
    num_tokens = int(scored.sum())
    nll_sum = nll.sum()
    return LossOutput(loss=nll_sum / max(num_tokens, 1), nll_sum=nll_sum.detach(), num_tokens=num_tokens,
                      num_masked=torch.zeros((), device=x0.device), seq_nll=nll.detach().sum(1),
                      seq_tokens=scored.sum(1), t=torch.zeros(B, device=x0.device))


@torch.no_grad()
def generative_perplexity(judge, tokens: torch.Tensor, batch_size: int = 32) -> dict:
    """The judge's perplexity of samples `tokens` (B, L): exp of the mean NLL of tokens 2..L
    given their prefix (the first token has no context). Returns {gen_ppl, gen_nll, tokens}."""
    require(getattr(getattr(judge, "cfg", None), "causal", False),
            "the judge must be a causal model (a run trained with model.causal=true)")
    require(tokens.dim() == 2 and tokens.shape[1] >= 2, f"samples must be (B, L >= 2), got {tuple(tokens.shape)}")
    require(int(tokens.max()) < judge.vocab_size,
            f"samples hold token id {int(tokens.max())} but the judge knows {judge.vocab_size} tokens: "
            "it must be trained on the same tokenizer")
    was_training = judge.training
    judge.eval()
    device = next(judge.parameters()).device
    nll_sum, count = 0.0, 0
    for i in range(0, tokens.shape[0], batch_size):
        out = ar_loss(judge, tokens[i:i + batch_size].to(device))
        nll_sum += float(out.nll_sum.double())
        count += out.num_tokens
    judge.train(was_training)
    nll = nll_sum / count
    return {"gen_ppl": math.exp(min(nll, 700.0)), "gen_nll": nll, "tokens": count}


def unigram_entropy(tokens: torch.Tensor) -> float:
    """Mean over samples of the entropy (nats) of each sample's token histogram (MDLM's
    sample-entropy check: repetitive samples have low entropy)."""
    ents = []
    for row in tokens.cpu():
        counts = torch.bincount(row).double()
        p = counts[counts > 0] / row.numel()
        ents.append(float(-(p * p.log()).sum()))
    return sum(ents) / len(ents)
