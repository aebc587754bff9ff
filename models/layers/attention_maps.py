"""The attention map `xla-trainer visualize` draws: where the last block's query looks."""
import torch


def query_attention(q: torch.Tensor, k: torch.Tensor, prefix_tokens: int,
                    attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N): softmax(q k^T / sqrt(d)) of q, k (B, heads, L, d) under attn_mask (True = may
    attend), averaged over the heads; the row of the cls query (the first of `prefix_tokens`, cls
    first) or, without one, the mean of the patch rows; the columns of the N patch tokens."""
    logits = (q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf"))
    weights = logits.softmax(-1).mean(1)  # (B, L, L)
    rows = weights[:, 0] if prefix_tokens else weights.mean(1)
    return rows[:, prefix_tokens:]
