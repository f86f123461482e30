"""The T-GM model in one file: an iGPT-style decoder-only transformer over palette tokens.

An image of S*S pixels is a sequence of T = S*S palette indices in raster order. The input is a start token
followed by the first T-1 pixels; the model predicts every pixel from the ones before it. For
classification, iGPT average-pools the final-layer features over the sequence and adds a linear head; T-GM
can instead average them over a g x g grid of image regions (`cls_grid`) and concatenate the cells, which keeps
where in the image a feature fired (grid 1 is iGPT's plain average).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class TGMConfig:
    palette_size: int  # number of pixel tokens; the start token gets index palette_size
    seq_len: int  # pixels per image (image_size ** 2)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    n_classes: int = 0  # 0: no classification head (pretraining)
    cls_grid: int = 1  # the head sees features averaged over cls_grid x cls_grid image regions


class KVCache:
    """Keys and values of the positions already processed, per attention layer, for incremental sampling."""

    def __init__(self):
        self.kv: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        self.length = 0  # positions already cached

    def extend(self, layer: nn.Module, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.kv:
            pk, pv = self.kv[layer]
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        self.kv[layer] = (k, v)
        return k, v


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: TGMConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        causal = True
        if cache is not None:
            k, v = cache.extend(self, k, v)  # (B, nh, T_past + T, hs)
            # One new position sees every cached one; a multi-position prefill on an empty cache is causal.
            causal = T > 1
        dropout = self.dropout if self.training else 0.0
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and q.dtype != torch.float32:
            # PyTorch's CPU flash-attention backward is ~4x slower in bf16 than in fp32 (measured with
            # torch 2.14), while the matmuls around it gain ~3x from bf16: keep attention itself in fp32.
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal, dropout_p=dropout)
        else:
            # SDPA picks the fused / flash kernel available on the device.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: TGMConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, cfg: TGMConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class TGM(nn.Module):
    def __init__(self, cfg: TGMConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.palette_size + 1, cfg.n_embd)  # +1: the start token
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.seq_len, cfg.n_embd))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.palette_size, bias=False)
        self.cls_head = nn.Linear(cfg.n_embd * cfg.cls_grid**2, cfg.n_classes) if cfg.n_classes else None
        self.apply(self._init_weights)
        nn.init.normal_(self.pos_emb, std=0.02)
        # GPT-2: scale the residual projections by depth so the residual stream's variance stays put.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def start_token(self) -> int:
        return self.cfg.palette_size

    def shift_right(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) pixels -> (B, T) inputs: the start token, then pixels 0..T-2."""
        start = torch.full_like(tokens[:, :1], self.start_token)
        return torch.cat([start, tokens[:, :-1]], dim=1)

    def hidden(self, inputs: torch.Tensor, all_layers: bool = False, cache: KVCache | None = None):
        """Final-layer features (B, T, C) after ln_f; with all_layers, also the embedding output (layer 0)
        and each block's output (layers 1..n_layer).

        With a cache, `inputs` are the positions after those already cached, and the cache grows by them.
        """
        B, T = inputs.shape
        start = cache.length if cache is not None else 0
        x = self.drop(self.tok_emb(inputs) + self.pos_emb[:, start : start + T])  # (B, T, C)
        layers = [x] if all_layers else []
        for block in self.blocks:
            x = block(x, cache)
            if all_layers:
                layers.append(x)
        if cache is not None:
            cache.length += T
        x = self.ln_f(x)
        return (x, layers) if all_layers else x

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pixel logits (B, T, K) for next-pixel prediction, and class logits (B, n_classes) or None."""
        h = self.hidden(self.shift_right(tokens))  # (B, T, C)
        logits = self.lm_head(h)
        class_logits = self.cls_head(grid_pool(h, self.cfg.cls_grid)) if self.cls_head is not None else None
        return logits, class_logits

    @torch.no_grad()
    def complete(
        self,
        prefix: torch.Tensor,
        generator: torch.Generator,
        temperature: float = 1.0,
        top_k: int = 0,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Sample the pixels after `prefix` (B, P) until the sequence is full; returns (B, T).

        With use_cache (the default) each step feeds only the newest pixel and reuses the keys and values
        of the earlier ones; without it, each step recomputes the whole sequence (the reference path).
        """
        B = prefix.size(0)
        start = torch.full((B, 1), self.start_token, dtype=prefix.dtype, device=prefix.device)
        tokens, cache = prefix, (KVCache() if use_cache else None)
        step_inputs = torch.cat([start, prefix], dim=1)  # (B, P + 1)
        for _ in range(self.cfg.seq_len - prefix.size(1)):
            if cache is None:
                step_inputs = torch.cat([start, tokens], dim=1)
            logits = self.lm_head(self.hidden(step_inputs, cache=cache)[:, -1]).float() / temperature  # (B, K)
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(tokens.device)  # (B, 1)
            tokens = torch.cat([tokens, nxt], dim=1)
            step_inputs = nxt
        return tokens

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def grid_pool(h: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, T, C) raster-order features of square images -> (B, grid * grid * C): each cell's average."""
    if grid == 1:
        return h.mean(dim=1)
    B, T, C = h.shape
    S = math.isqrt(T)
    cells = F.adaptive_avg_pool2d(h.transpose(1, 2).reshape(B, C, S, S), grid)  # (B, C, grid, grid)
    return cells.permute(0, 2, 3, 1).reshape(B, grid * grid * C)


def next_pixel_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-pixel cross-entropy in nats of pixel logits (B, T, K); divide by ln 2 for bits per pixel."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), tokens.reshape(-1))


def save_model(model: TGM, directory: str | Path, extra: dict | None = None) -> None:
    """Weights as safetensors plus a JSON config; `extra` (class names, ...) goes into the config."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps({"model": asdict(model.cfg), **(extra or {})}, indent=2) + "\n")


def load_config(directory: str | Path) -> dict:
    return json.loads((Path(directory) / CONFIG_FILE).read_text())


def load_model(
    directory: str | Path,
    map_location: str = "cpu",
    n_classes: int | None = None,
    strict: bool = True,
    cls_grid: int | None = None,
) -> TGM:
    """Rebuild a model from its directory. `n_classes` and `cls_grid` override the saved head (pretrained ->
    classifier)."""
    from safetensors.torch import load_file

    cfg = TGMConfig(**load_config(directory)["model"])
    if n_classes is not None:
        cfg.n_classes = n_classes
    if cls_grid is not None:
        cfg.cls_grid = cls_grid
    model = TGM(cfg)
    state = load_file(str(Path(directory) / WEIGHTS_FILE), device=map_location)
    missing, unexpected = model.load_state_dict(state, strict=strict)
    if not strict and [k for k in missing if not k.startswith("cls_head")]:
        raise ValueError(f"{directory}: weights are missing {missing}")
    return model.to(map_location)
