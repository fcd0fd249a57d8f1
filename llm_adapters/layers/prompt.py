"""Soft prompts: prefix tuning's per-layer key/value prefixes and prompt tuning's embeddings."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class PrefixEncoder(nn.Module):
    """Learned key/value prefixes for every attention layer.

    Holds [P, L · 2 · H_kv · D] (optionally produced by a two-layer tanh MLP from a [P, hidden]
    table, the reparameterisation of Li & Liang) and returns, for a batch of B sequences,
    L pairs (key, value) of shape [B, H_kv, P, D].
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        hidden_size: int,
        prefix_projection: bool = False,
        encoder_hidden_size: int | None = None,
    ) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        width = num_layers * 2 * num_kv_heads * head_dim
        if prefix_projection:
            inner = encoder_hidden_size or hidden_size
            self.embedding = nn.Embedding(num_virtual_tokens, hidden_size)
            self.transform = nn.Sequential(
                nn.Linear(hidden_size, inner), nn.Tanh(), nn.Linear(inner, width)
            )
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, width)
            self.transform = None

    def forward(self, batch_size: int, dtype: torch.dtype) -> list[tuple[Tensor, Tensor]]:
        table = self.embedding.weight
        if self.transform is not None:
            table = self.transform(table)
        p, layers = self.num_virtual_tokens, self.num_layers
        heads, dim = self.num_kv_heads, self.head_dim
        kv = table.to(dtype).view(p, layers * 2, heads, dim).permute(1, 2, 0, 3)  # [2L, H, P, D]
        return [
            (
                kv[2 * i].unsqueeze(0).expand(batch_size, -1, -1, -1),
                kv[2 * i + 1].unsqueeze(0).expand(batch_size, -1, -1, -1),
            )
            for i in range(layers)
        ]


class PromptEmbedding(nn.Module):
    """A learned [P, hidden] soft prompt prepended to the input embeddings."""

    def __init__(self, num_virtual_tokens: int, hidden_size: int, init: Tensor | None = None):
        super().__init__()
        self.embedding = nn.Embedding(num_virtual_tokens, hidden_size)
        if init is not None:
            with torch.no_grad():
                self.embedding.weight.copy_(init)

    def forward(self, batch_size: int, dtype: torch.dtype) -> Tensor:
        return self.embedding.weight.to(dtype).unsqueeze(0).expand(batch_size, -1, -1)
