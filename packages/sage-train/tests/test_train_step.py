"""A tiny causal language model trains with its attention routed to train_s8."""

import warnings

import torch
import torch.nn.functional as F

import sage_train


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=16, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.emb = torch.nn.Embedding(vocab, dim)
        self.pos = torch.nn.Parameter(torch.randn(64, dim) * 0.1)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 64), torch.nn.GELU(), torch.nn.Linear(64, dim))
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, tokens):
        b, s = tokens.shape
        x = self.emb(tokens) + self.pos[:s]
        q, k, v = self.qkv(x).reshape(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, -1))
        x = x + self.mlp(x)
        return self.head(x)


def test_tiny_model_loss_decreases(seed):
    """Task: every position predicts the sequence's first token (random), which only attention
    can fetch. The loss must fall well below its starting value (ln 16 ≈ 2.8)."""
    g = torch.Generator().manual_seed(seed)
    model = TinyLM()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sage_train.patch_model(model)
    calls = []
    orig = sage_train._patch._function.attention

    def counting(*a, **kw):
        calls.append(1)
        return orig(*a, **kw)

    sage_train._patch._function.attention = counting
    losses = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sage_train.SageTrainFallbackWarning)
            for _ in range(40):
                seq = torch.randint(0, 16, (16, 12), generator=g)
                logits = model(seq)
                loss = F.cross_entropy(logits.reshape(-1, 16), seq[:, :1].expand(-1, 12).reshape(-1))
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
    finally:
        sage_train._patch._function.attention = orig
        sage_train.unpatch_model(model)
    assert len(calls) == 40, "attention was not routed to train_s8"
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert all(torch.isfinite(torch.tensor(losses)))
    assert last < 0.5 * first, f"seed={seed}: loss {first:.3f} -> {last:.3f}"
