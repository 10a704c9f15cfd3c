"""A small MLP eps-model for 2-D data, with a sinusoidal time embedding and optional class labels."""
from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer-style sinusoidal embedding of (B,) float timesteps -> (B, dim) (Vaswani et al. 2017, Sec. 3.5).

    Same frequencies as diffusers' ``get_timestep_embedding`` with flip_sin_to_cos=True (cos first).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([args.cos(), args.sin()], dim=-1)


class MLPDenoiser(nn.Module):
    """eps_theta(x, t, class_labels) for 2-D points.

    Input: x (B, 2), t (B,) float timesteps in [0, T-1], class_labels (B,) long or None.
    With ``num_classes`` set, label ``num_classes`` is the *null class* used for classifier-free
    guidance; ``class_labels=None`` means the null class.

    With ``time_cond_proj_dim`` set, ``timestep_cond`` (B, time_cond_proj_dim) is an extra embedding added to the
    sinusoidal time embedding through a bias-free linear map, exactly as diffusers' ``TimestepEmbedding.cond_proj``
    does for ``UNet2DConditionModel(time_cond_proj_dim=...)``: the LCM student receives its guidance scale w this
    way (``minilcm.lcm.guidance_embedding``; Luo et al. 2023, Sec. 4.2). ``timestep_cond=None`` adds nothing.
    """

    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 4, t_dim: int = 64,
                 num_classes: int | None = None, time_cond_proj_dim: int | None = None):
        super().__init__()
        self.config = dict(dim=dim, hidden=hidden, depth=depth, t_dim=t_dim, num_classes=num_classes)
        if time_cond_proj_dim is not None:  # only then: configs of MLPs without it stay as they were
            self.config["time_cond_proj_dim"] = time_cond_proj_dim
        self.num_classes = num_classes
        self.t_dim = t_dim
        self.t_mlp = nn.Sequential(nn.Linear(t_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.label_emb = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, dim))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)
        # created last, so the other layers draw the same initial weights with or without it
        self.cond_proj = nn.Linear(time_cond_proj_dim, t_dim, bias=False) if time_cond_proj_dim else None

    @property
    def null_class(self) -> int | None:
        return self.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None,
                timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.config["dim"]:
            raise ValueError(f"MLPDenoiser expects x of shape (B, {self.config['dim']}), got {tuple(x.shape)}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        temb = timestep_embedding(t, self.t_dim)  # (B, t_dim)
        if timestep_cond is not None:
            if self.cond_proj is None:
                raise ValueError("timestep_cond was given but this MLPDenoiser has no time_cond_proj_dim")
            temb = temb + self.cond_proj(timestep_cond.to(temb.dtype))  # (B, t_dim)
        emb = self.t_mlp(temb)  # (B, hidden)
        if self.label_emb is not None:
            if class_labels is None:
                class_labels = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.label_emb(class_labels)
        elif class_labels is not None:
            raise ValueError("this MLPDenoiser is unconditional (num_classes=None) but class_labels were given")
        h = self.inp(x) + emb
        for block in self.blocks:
            h = h + block(h + emb)
        return self.out(h)
