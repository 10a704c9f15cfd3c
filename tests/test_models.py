import pytest
import torch

from minilcm.models import MLPDenoiser, cifar_unet, timestep_embedding


def test_mlp_call_convention_and_null_class():
    m = MLPDenoiser(hidden=32, depth=2, num_classes=4)
    x, t = torch.randn(5, 2), torch.tensor([0.0, 1.5, 10.0, 500.0, 999.0])
    assert m(x, t).shape == (5, 2)
    for p in m.out.parameters():  # zero-initialised output: perturb so labels matter
        torch.nn.init.normal_(p)
    null = torch.full((5,), 4)
    assert torch.equal(m(x, t), m(x, t, class_labels=null))
    assert not torch.allclose(m(x, t), m(x, t, class_labels=torch.zeros(5, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        m(torch.randn(5, 3), t)
    with pytest.raises(ValueError, match="unconditional"):
        MLPDenoiser(hidden=8, depth=1)(x, t, class_labels=null)


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 3.0, 250.5, 999.0])
    ref = get_timestep_embedding(t, 64, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.allclose(timestep_embedding(t, 64), ref, atol=1e-5)


def test_cifar_unet_convention():
    m = cifar_unet("tiny", num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([10.0, 900.0])
    assert m(x, t).shape == x.shape
    assert m.null_class == 10
    with torch.no_grad():
        assert torch.equal(m(x, t), m(x, t, class_labels=torch.tensor([10, 10])))
    with pytest.raises(ValueError, match="expected images"):
        m(torch.randn(2, 1, 32, 32), t)
    with pytest.raises(ValueError, match="unknown UNet size"):
        cifar_unet("huge")
