"""Expected Attention: the attention future queries are expected to pay, from the statistics of past queries."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Method, PrefillContext, check_range, first_real
from ..protocol import Selection
from ..rope import cos_sin, mean_rotation, unrotate


@dataclass
class ExpectedAttention(Method):
    """Keep the entries that queries *after* the context are expected to attend to most (query-agnostic).

    Paper: Devoto et al., "Expected Attention: KV Cache Compression by Estimating Attention from Future Queries
    Distribution", 2025 (arXiv 2510.00636). The context's pre-RoPE queries are modelled as a Gaussian per query head;
    with RoPE averaged over the next ``n_future`` positions, each key gets the expected logit of a future query,
    softmax-normalised, averaged over the KV group and multiplied by ``||v||``. No question is needed.

    Parameters
    ----------
    n_future : int
        Future positions whose RoPE rotations are averaged (paper: 512).
    n_sink : int
        Leading tokens always kept and left out of the query statistics (paper: 4).
    use_covariance, use_vnorm, epsilon
        The covariance term, the value-norm factor, and a constant added before it (paper: yes, yes, 0).

    CHOICE and the derivation: see docs/methods/expected_attention.md.
    """

    n_future: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0

    name = "expected_attention"
    summary = "Query-agnostic: expected attention of future queries from query statistics (Devoto et al., 2025)"

    def validate(self) -> None:
        cls = type(self).__name__
        check_range(cls, "n_future", self.n_future, 1)
        check_range(cls, "n_sink", self.n_sink, 0)
        check_range(cls, "epsilon", self.epsilon, 0.0)

    def scores(self, ctx: PrefillContext) -> torch.Tensor:
        """Expected attention per KV head [B, H, n] (sinks and padding not special-cased)."""
        model = ctx.layer.cache.model_ref()
        B, Hq, n, d = ctx.query.shape
        H = ctx.num_kv_heads
        real = ctx.real
        rope_pos = (real.long().cumsum(-1) - 1).clamp(min=0)  # the positions RoPE used (left padding skipped)
        if ctx.positions.dim() == 2:  # pruned earlier layers: original positions of the kept tokens
            rope_pos = ctx.positions.long()
        q = ctx.query.float()
        cos, sin = cos_sin(model, ctx.layer.layer_idx, rope_pos, q)
        pre = unrotate(q, cos[:, None].float(), sin[:, None].float())  # [B, Hq, n, d]
        use = real & ~first_real(real, self.n_sink)
        if not bool(use.any(-1).all()):
            use = real
        w = use.float()[:, None, :, None]
        count = w.sum(2).clamp(min=1)  # [B, 1, 1]
        mu = (pre * w).sum(2) / count  # [B, Hq, d]
        future = ctx.n_real.long()[:, None] + torch.arange(self.n_future, device=q.device)[None]
        fcos, fsin = cos_sin(model, ctx.layer.layer_idx, future, q)
        R = mean_rotation(fcos.float(), fsin.float())  # [B, d, d]
        mu = torch.einsum("bij,bhj->bhi", R, mu)
        K = ctx.keys.float().repeat_interleave(Hq // H, dim=1)  # [B, Hq, n, d]
        s = ctx.scaling
        logits = s * torch.einsum("bhnd,bhd->bhn", K, mu)
        if self.use_covariance:
            centred = (pre - (pre * w).sum(2, keepdim=True) / count[..., None]) * w
            cov = torch.einsum("bhni,bhnj->bhij", centred, centred) / count[..., None]
            cov = R[:, None] @ cov @ R[:, None].transpose(-1, -2)
            logits = logits + 0.5 * s * s * torch.einsum("bhni,bhij,bhnj->bhn", K, cov, K)
        logits = logits.masked_fill(~real[:, None, :], float("-inf"))
        probs = torch.softmax(logits, -1).view(B, H, Hq // H, n).mean(2)
        if self.use_vnorm:
            probs = (probs + self.epsilon) * ctx.values.float().norm(dim=-1)
        return probs

    def prefill(self, ctx: PrefillContext) -> Selection:
        sinks = first_real(ctx.real, self.n_sink)
        return Selection(self.top(ctx, self.scores(ctx), ctx.budget_tokens, force=sinks))
