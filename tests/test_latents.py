"""The autoencoder's second phase and the latent statistics (minilcm.latents): the perceptual distance, the
patch-GAN decoder objective on a frozen encoder, and the per-channel normalisation of the latents."""
from __future__ import annotations

import torch

from minilcm.evaluator import EvaluatorNet
from minilcm.latents import (DecoderFinetuneLoss, PatchDiscriminator, PerceptualDistance, decode, encode,
                             freeze_encoder, latent_stats, vae_factors)
from minilcm.models.sd import minisd_vae


def _net():
    torch.manual_seed(0)
    return EvaluatorNet((8, 16, 16, 16)).eval()


def test_perceptual_distance_is_zero_on_equal_images_and_grows_with_blur():
    d = PerceptualDistance(_net())
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    blur = torch.nn.functional.avg_pool2d(x, 3, 1, 1)
    assert d(x, x).abs().max() < 1e-6
    near, far = d(x, 0.9 * x + 0.1 * blur).mean(), d(x, blur).mean()
    assert 0 < near < far
    d.train()
    assert not any(m.training for m in d.modules())  # its BatchNorm keeps the classifier's statistics


def test_patch_discriminator_gives_an_8x8_logit_map():
    assert PatchDiscriminator()(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 8, 8)


def test_decoder_finetune_trains_the_decoder_and_the_discriminator_not_the_encoder():
    torch.manual_seed(0)
    vae = minisd_vae("tiny")
    freeze_encoder(vae)
    loss = DecoderFinetuneLoss(PerceptualDistance(_net()), disc_start=1)
    enc0 = [p.clone() for p in vae.encoder.parameters()]
    disc0 = [p.clone() for p in loss.disc.parameters()]
    opt = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=1e-3)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    for _ in range(2):
        out = loss(vae, x)
        opt.zero_grad()
        out.backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(enc0, vae.encoder.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(disc0, loss.disc.parameters()))
    assert vae.decoder.conv_out.weight.grad is not None and int(loss.calls) == 2
    assert set(loss.last) == {"l1", "lpips", "disc", "gen"}
    assert "disc.net.0.weight" in loss.state_dict()  # checkpointed with the run


def test_latent_stats_normalise_every_channel_and_round_trip():
    torch.manual_seed(0)
    z = torch.randn(500, 4, 8, 8) * torch.tensor([0.5, 1.0, 2.0, 0.8]).view(1, 4, 1, 1) \
        + torch.tensor([1.0, -0.5, 0.0, 3.0]).view(1, 4, 1, 1)
    mean, std = latent_stats(z)
    assert max(abs(a - b) for a, b in zip(mean, [1.0, -0.5, 0.0, 3.0])) < 0.02
    assert max(abs(a / b - 1) for a, b in zip(std, [0.5, 1.0, 2.0, 0.8])) < 0.02
    vae = minisd_vae("tiny")
    sf, m0, s0 = vae_factors(vae)  # a config without statistics: mean 0 (no shift_factor), std 1
    assert torch.equal(m0, torch.zeros(1, 4, 1, 1)) and torch.equal(s0, torch.ones(1, 4, 1, 1))
    vae.register_to_config(scaling_factor=1.0, latents_mean=mean, latents_std=std)
    sf, m, s = vae_factors(vae)
    zs = (z - m) * (sf / s)
    per_channel = zs.transpose(0, 1).reshape(4, -1)
    assert per_channel.mean(1).abs().max() < 1e-3 and (per_channel.std(1) - 1).abs().max() < 1e-3
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    lat = encode(vae, x, scaling_factor=sf, mean=m, std=s)  # the scaled latents decode to D(E(x)), as unscaled
    torch.testing.assert_close(decode(vae, lat, scaling_factor=sf, mean=m, std=s), decode(vae, encode(vae, x)),
                               atol=1e-5, rtol=1e-4)
