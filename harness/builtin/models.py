"""Built-in models: a plain MLP, a GCN for node classification, a GIN-style graph regressor, a small GPT.

Registered as a user's model would be: a class whose ``__init__`` takes its recipe keys as keyword
arguments; ``in_dim`` and ``out_dim`` are filled in from the data when the recipe leaves them out.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import nn

from harness.components import register
from harness.contracts import ConfigError

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


@register("model", "mlp", summary="multi-layer perceptron for tables (outputs logits)")
class Mlp(nn.Module):
    """Outputs logits: the loss applies the sigmoid/softmax (BCEWithLogits is the stable BCE)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: list[int] = (64, 32),
                 activation: Literal["relu", "gelu", "tanh"] = "relu", dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for size in hidden:
            layers += [nn.Linear(width, size), ACTIVATIONS[activation]()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, out_dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x if x.is_floating_point() else x.float())


@register("model", "gcn", summary="GCN for node classification (needs graph data)")
class Gcn(nn.Module):
    """The seed's GCNConv stack: conv, ReLU, dropout, ..., conv."""

    def __init__(self, in_dim: int, out_dim: int, hidden: list[int] = (64,), dropout: float = 0.5):
        super().__init__()
        from torch_geometric.nn import GCNConv

        sizes = [in_dim, *hidden, out_dim]
        self.convs = nn.ModuleList(GCNConv(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.dropout = dropout

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            x = conv(x, edge_index)
            if i < len(self.convs) - 1:
                x = torch.relu(x)
                x = nn.functional.dropout(x, p=self.dropout, training=self.training)
        return x


@register("model", "gin", summary="GIN + sum pooling for graph-level targets (needs graph data)")
class GinRegressor(nn.Module):
    """GIN layers, sum pooling (counts survive it), an MLP head. Works for classification too."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 64, layers: int = 3, dropout: float = 0.0):
        super().__init__()
        from torch_geometric.nn import GINConv

        def mlp(a: int, b: int) -> nn.Sequential:
            return nn.Sequential(nn.Linear(a, b), nn.ReLU(), nn.Linear(b, b))

        dims = [in_dim] + [hidden] * layers
        self.convs = nn.ModuleList(GINConv(mlp(a, b)) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(hidden, out_dim))

    def forward(self, x, edge_index, batch, num_graphs: int) -> torch.Tensor:
        from torch_geometric.nn import global_add_pool

        for conv in self.convs:
            x = torch.relu(conv(x, edge_index))
        return self.head(global_add_pool(x, batch, size=num_graphs))


class _Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then an MLP."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.heads, self.dropout = heads, dropout
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                              dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(attended.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.mlp(self.norm2(x)))


@register("model", "gpt", summary="a small GPT in nanoGPT's interface: forward(idx, targets) -> (logits, loss)")
class Gpt(nn.Module):
    """Token and position embeddings, pre-norm causal transformer blocks, a head tied to the token
    embedding (as GPT-2 and nanoGPT). ``forward(idx, targets=None)`` returns ``(logits, loss)``,
    the loss the mean cross-entropy over the targets that are not ``ignore_index``."""

    def __init__(self, in_dim: int, out_dim: int, dim: int = 64, layers: int = 2, heads: int = 4,
                 dropout: float = 0.0, ignore_index: int = -100):
        super().__init__()
        self.block_size, self.ignore_index = in_dim, ignore_index  # in_dim: the data's window length
        self.wte, self.wpe = nn.Embedding(out_dim, dim), nn.Embedding(in_dim, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, out_dim, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        for module in self.modules():  # GPT-2's initialisation, as nanoGPT's
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor = None):
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                               ignore_index=self.ignore_index)
        return logits, loss


@register("model", "hf_gpt2", summary="Hugging Face transformers' GPT2LMHeadModel built from a config (no download; "
                                     "needs transformers: pip install -e .[hf])")
def hf_gpt2(in_dim: int, out_dim: int, dim: int = 64, layers: int = 2, heads: int = 4, dropout: float = 0.0,
            tie_word_embeddings: bool = True, positions: Optional[int] = None) -> nn.Module:
    """``GPT2LMHeadModel(GPT2Config(...))``: ``positions`` (default ``in_dim``, the data's window)
    positions, ``out_dim`` tokens; its forward takes ``input_ids``, ``attention_mask``, ``labels`` (shifted inside) and
    returns a ModelOutput with ``loss`` and ``logits``. Nothing is downloaded."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        raise ConfigError("model.name: hf_gpt2 needs the transformers package: pip install -e .[hf] "
                          "(or pip install transformers)") from None
    config = GPT2Config(vocab_size=out_dim, n_positions=positions or in_dim, n_embd=dim, n_layer=layers, n_head=heads,
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=0, eos_token_id=0,
                        tie_word_embeddings=tie_word_embeddings)
    return GPT2LMHeadModel(config)
