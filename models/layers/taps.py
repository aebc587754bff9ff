"""What every student's forward_taps does once its tokens are embedded."""
import torch


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Tokens `index` (B, M) of x (B, N, C), in that order."""
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))


def block_outputs(blocks, x: torch.Tensor, attn_mask: torch.Tensor | None, taps) -> list[torch.Tensor]:
    """The outputs of blocks `taps` (1-based) run in turn over x under attn_mask (None: full).
    Blocks that run themselves (`run_taps`: the XLA runtime's scan, runtime.scan_blocks) do."""
    if hasattr(blocks, "run_taps"):
        return blocks.run_taps(x, attn_mask, taps)
    outs = []
    for i, block in enumerate(blocks, start=1):
        x = block(x, attn_mask=attn_mask)
        if i in taps:
            outs.append(x)
    return outs
