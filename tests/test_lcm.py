"""Latent consistency models (Chapter 5): the w-embedding, CFG inside the solver step, LCD, the LCM sampler.

Checked against independent references: diffusers' LCMScheduler (sampler, timesteps), DDIMScheduler driven with
classifier-free guidance (the augmented PF-ODE step), the LCD reference script's formulas (the loss), the
LatentConsistencyModelPipeline's w-embedding; and, on the 2-D class-conditional mixture with its exact oracle
teacher, what LCD should learn: w-conditioned 2-step samples whose class sharpness rises with w like the teacher's.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minilcm.consistency import ConsistencyModel, LCMScalings, l2
from minilcm.toys import GaussianMixture, OracleEps
from minilcm.diffusion import eps_to_x0, model_eps, q_sample
from minilcm.guidance import ClassConditioning, guided_ddim_step, guided_eps, GuidedEps, TextConditioning
from minilcm.lcm import (GuidanceDistillation, LatentConsistencyDistillation, guidance_embedding, lcm_sample,
                         lcm_student, lcm_timesteps, skipping_timesteps, with_guidance_input)
from minilcm.metrics import sliced_wasserstein
from minilcm.models import MLPDenoiser
from minilcm.schedules import Schedule, broadcast
from minilcm.solvers import ddim
from minilcm.train import TrainConfig, train

SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
W_DIM = 32



@pytest.fixture(scope="module")
def sd():
    return Schedule("scaled_linear")


def tiny_unet(time_cond_proj_dim=None, seed=0):
    """A random-weight UNet2DConditionModel, Stable-Diffusion-shaped: 4 latent channels, cross-attention."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8, time_cond_proj_dim=time_cond_proj_dim).eval()


class DataLike(nn.Module):
    """eps of N(0, I) data (sigma_t x) plus alpha_t times a random UNet2DConditionModel (cond passed through).

    A bare random UNet's x0 = (x - sigma eps) / alpha is ~50 at t = 999, where float32 rounding alone is ~4e-5;
    the Gaussian part keeps x0 O(1), as a trained model's is, so 1e-5 is a meaningful absolute tolerance.
    """

    def __init__(self, unet, schedule):
        super().__init__()
        self.unet, self.schedule = unet, schedule
        self.config = unet.config  # a wrapper shows its net's config: lcm_sample reads time_cond_proj_dim there

    def forward(self, x, t, **cond):
        tt = torch.as_tensor(t).reshape(-1)
        return (broadcast(self.schedule.sigma(tt), x) * x
                + broadcast(self.schedule.alpha(tt), x) * self.unet(x, t, **cond).sample)


# ---- the w input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [32, 33, 256])
def test_guidance_embedding_equals_the_lcm_pipeline(dim):
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([0.0, 0.5, 3.0, 7.5, 14.0])
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
    assert torch.allclose(guidance_embedding(w, dim), ref, atol=1e-6)


def test_guidance_embedding_closed_form():
    emb = guidance_embedding(torch.tensor([0.0, 2.0]), 8)  # half = 4, f_j = 10000^(-j/3)
    assert torch.equal(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    f = torch.tensor([10000.0 ** (-j / 3) for j in range(4)])
    assert torch.allclose(emb[1], torch.cat([(2000 * f).sin(), (2000 * f).cos()]), atol=1e-4)
    assert guidance_embedding(1.5, 8).shape == (1, 8)


def test_mlp_guidance_input_is_additive():
    torch.manual_seed(0)
    plain = MLPDenoiser(hidden=32, depth=2, num_classes=4)
    torch.manual_seed(0)
    with_w = MLPDenoiser(hidden=32, depth=2, num_classes=4, time_cond_proj_dim=8)
    assert "time_cond_proj_dim" not in plain.config and plain.cond_proj is None
    assert set(with_w.state_dict()) - set(plain.state_dict()) == {"cond_proj.weight"}
    for k, v in plain.state_dict().items():  # the new layer is created last: the others are unchanged
        assert torch.equal(v, with_w.state_dict()[k])
    nn.init.normal_(with_w.out[-1].weight)
    plain.load_state_dict({k: v for k, v in with_w.state_dict().items() if k != "cond_proj.weight"})
    x, t, c = torch.randn(5, 2), torch.full((5,), 300.0), torch.arange(5) % 5
    assert torch.equal(plain(x, t, c), with_w(x, t, c))  # no timestep_cond: the old behaviour
    assert not torch.allclose(with_w(x, t, c, timestep_cond=guidance_embedding(torch.full((5,), 2.0), 8)),
                              with_w(x, t, c))
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        plain(x, t, c, timestep_cond=torch.zeros(5, 8))


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_student_starts_as_the_teacher_for_every_w(kind, sd):
    if kind == "mlp":
        torch.manual_seed(1)
        teacher = MLPDenoiser(hidden=32, depth=2, num_classes=4)
        nn.init.normal_(teacher.out[-1].weight, std=0.3)
        x, cond = torch.randn(6, 2), {"class_labels": torch.arange(6) % 5}
    else:
        teacher = tiny_unet()
        x, cond = torch.randn(2, 4, 8, 8), {"encoder_hidden_states": torch.randn(2, 5, 16)}
    student = lcm_student(teacher, sd, w_dim=W_DIM, w_init="zero")
    assert student.net is not teacher and student.scaling == LCMScalings()
    t = torch.tensor([999.0, 259.0] * (x.shape[0] // 2))
    with torch.no_grad():
        x0_teacher = eps_to_x0(sd, x, t.double(), model_eps(teacher, x, t, cond))
        c_skip, c_out = LCMScalings()(sd, t, 0.0)
        for w in (0.0, 4.0):
            f = student(x, t, **cond, timestep_cond=guidance_embedding(torch.full((x.shape[0],), w), W_DIM))
            assert torch.allclose(f, broadcast(c_skip, x) * x + broadcast(c_out, x) * x0_teacher, atol=1e-5)
    with pytest.raises(TypeError, match="guidance"):
        with_guidance_input(nn.Linear(2, 2), 8)


# ---- classifier-free guidance inside the solver step ----------------------------------------------
class Counting(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.batches = net, []

    def forward(self, x, t, **cond):
        self.batches.append(x.shape[0])
        return self.net(x, t, **cond)


def test_guided_eps_is_one_fused_call(sd):
    net = Counting(DataLike(tiny_unet(), sd))
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([999.0, 500.0, 20.0])
    ehs, empty = torch.randn(3, 5, 16), torch.randn(1, 5, 16)
    with torch.no_grad():
        eps_w = guided_eps(net, x, t, {"encoder_hidden_states": ehs}, {"encoder_hidden_states": empty}, 2.5)
        assert net.batches == [6]
        eps_c = net(x, t, encoder_hidden_states=ehs)
        eps_u = net(x, t, encoder_hidden_states=empty.expand(3, -1, -1))
    assert torch.allclose(eps_w, 3.5 * eps_c - 2.5 * eps_u, atol=1e-5)
    with pytest.raises(ValueError, match="same keys"):
        guided_eps(net, x, t, {"encoder_hidden_states": ehs}, {}, 1.0)


def test_guided_ddim_step_equals_diffusers_guided_ddim(sd):
    """50 guided steps on the LCD grid (k = 20) = DDIMScheduler (trailing, set_alpha_to_one=False) with CFG at
    guidance_scale = w + 1, the reference script's DDIMSolver grid, whose last step lands on alpha_bar_0."""
    from diffusers import DDIMScheduler

    model = DataLike(tiny_unet(), sd)
    ref = DDIMScheduler(**SD_BETAS, set_alpha_to_one=False, timestep_spacing="trailing", clip_sample=False)
    ref.set_timesteps(50)
    assert torch.equal(ref.timesteps.double(), skipping_timesteps(sd, 20).flip(0))
    B, w = 2, 3.0
    x = torch.randn(B, 4, 8, 8)
    ehs, empty = torch.randn(B, 5, 16), torch.randn(1, 5, 16)
    x_ref, x_ours = x.clone(), x.clone()
    with torch.no_grad():
        for t in ref.timesteps:
            eps_c, eps_u = model(torch.cat([x_ref, x_ref]), t,
                                 encoder_hidden_states=torch.cat([ehs, empty.expand(B, -1, -1)])).chunk(2)
            x_ref = ref.step(eps_u + (w + 1) * (eps_c - eps_u), t, x_ref).prev_sample
            x_ours = guided_ddim_step(model, x_ours, sd, t.item(), max(t.item() - 20, 0),
                                      {"encoder_hidden_states": ehs}, {"encoder_hidden_states": empty}, w)
    assert (x_ours - x_ref).abs().max() <= 1e-5
    assert x_ref.abs().max() > 0.5  # not a vanishing comparison


def test_guided_ddim_step_per_row_times(sd):
    model = DataLike(tiny_unet(), sd)
    x, ehs, empty = torch.randn(4, 4, 8, 8), torch.randn(4, 5, 16), torch.randn(1, 5, 16)
    t = torch.tensor([999.0, 519.0, 19.0, 999.0])
    s = (t - 20).clamp(min=0)
    w = torch.tensor([0.0, 1.0, 4.0, 8.0])
    with torch.no_grad():
        rows = guided_ddim_step(model, x, sd, t, s, {"encoder_hidden_states": ehs}, {"encoder_hidden_states": empty}, w)
        for i in range(4):  # the scalar path is solvers.ddim_step
            one = guided_ddim_step(model, x[i:i + 1], sd, t[i].item(), s[i].item(), {"encoder_hidden_states":
                                   ehs[i:i + 1]}, {"encoder_hidden_states": empty}, w[i].item())
            assert torch.allclose(rows[i:i + 1], one, atol=1e-5)


# ---- the LCD loss ----------------------------------------------------------------------------------
def test_lcd_loss_equals_the_reference_script(sd):
    """One LCD loss = steps 2-10 of diffusers' train_lcm_distill_sd_wds.py (DDPMScheduler.add_noise, CFG on the
    x0 and eps predictions, DDIMSolver with alpha_bar_prev, boundary scalings, l2 loss), same random draws."""
    from diffusers import DDPMScheduler, LatentConsistencyModelPipeline

    teacher, k, B = tiny_unet(), 20, 4
    student = lcm_student(teacher, sd, w_dim=W_DIM)
    nn.init.normal_(student.net.time_embedding.cond_proj.weight, std=0.05)  # let w matter
    empty = torch.randn(1, 5, 16)
    loss_fn = LatentConsistencyDistillation(teacher, student, TextConditioning(empty), k=k, w_min=2.0, w_max=8.0,
                                            distance=l2)
    latents, ehs = 0.5 * torch.randn(B, 4, 8, 8), torch.randn(B, 5, 16)
    ours = loss_fn(student, (latents, ehs), torch.Generator().manual_seed(7))

    g = torch.Generator().manual_seed(7)  # LCD draws: the grid index, w, then the noise
    index = torch.randint(0, 50, (B,), generator=g)
    w = 2.0 + 6.0 * torch.rand(B, generator=g)
    noise = torch.randn(latents.shape, generator=g)
    ddpm = DDPMScheduler(**SD_BETAS)
    ac = ddpm.alphas_cumprod
    ddim_ts = torch.arange(1, 51) * k - 1
    start = ddim_ts[index]
    end = (start - k).clamp(min=0)
    ab_prev = torch.cat([ac[:1], ac[ddim_ts[:-1]]])[index].view(-1, 1, 1, 1)
    w_emb = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=W_DIM)

    def x0_of(eps, t, x):
        return (x - (1 - ac[t]).sqrt().view(-1, 1, 1, 1) * eps) / ac[t].sqrt().view(-1, 1, 1, 1)

    def scalings(t):
        st = 10.0 * t.view(-1, 1, 1, 1).double()
        return (0.25 / (st ** 2 + 0.25)).float(), (st / (st ** 2 + 0.25) ** 0.5).float()

    with torch.no_grad():
        x = ddpm.add_noise(latents, noise, start)
        cs, co = scalings(start)
        model_pred = cs * x + co * x0_of(student.net(x, start, encoder_hidden_states=ehs, timestep_cond=w_emb).sample,
                                         start, x)
        e_c = teacher(x, start, encoder_hidden_states=ehs).sample
        e_u = teacher(x, start, encoder_hidden_states=empty.expand(B, -1, -1)).sample
        wr = w.view(-1, 1, 1, 1)
        pred_x0 = x0_of(e_c, start, x) + wr * (x0_of(e_c, start, x) - x0_of(e_u, start, x))
        pred_noise = e_c + wr * (e_c - e_u)
        x_prev = ab_prev.sqrt() * pred_x0 + (1 - ab_prev).sqrt() * pred_noise
        cs, co = scalings(end)
        target_eps = loss_fn.target.net(x_prev, end, encoder_hidden_states=ehs, timestep_cond=w_emb).sample
        target = cs * x_prev + co * x0_of(target_eps, end, x_prev)
        ref = F.mse_loss(model_pred, target)
    assert ref > 0 and torch.allclose(ours, ref, rtol=1e-4)
    ours.backward()
    assert student.net.time_embedding.cond_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_skipping_grid_and_lcm_timesteps_equal_diffusers(sd):
    from diffusers import LCMScheduler

    assert skipping_timesteps(sd, 20)[[0, 1, -1]].tolist() == [19, 39, 999]
    assert torch.equal(skipping_timesteps(sd, 1), torch.arange(1000, dtype=torch.float64))
    ref = LCMScheduler(**SD_BETAS)
    for n in (1, 2, 3, 4, 8, 25, 50):
        ref.set_timesteps(n)
        assert torch.equal(lcm_timesteps(sd, n), ref.timesteps.double()), n
    ref.set_timesteps(4, original_inference_steps=100)
    assert torch.equal(lcm_timesteps(sd, 4, original_steps=100), ref.timesteps.double())
    with pytest.raises(ValueError):
        lcm_timesteps(sd, 51)


# ---- the LCM sampler -------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 4])
def test_lcm_sample_equals_diffusers_lcm_scheduler(n, sd):
    """Same UNet (with a random w projection), noise, timesteps and noise between steps (one CPU generator)."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    model = DataLike(tiny_unet(time_cond_proj_dim=W_DIM, seed=3), sd)
    B, guidance_scale = 3, 7.5
    x, ehs = torch.randn(B, 4, 8, 8), torch.randn(B, 5, 16)
    ref = LCMScheduler(**SD_BETAS)
    ref.set_timesteps(n)
    w_emb = LatentConsistencyModelPipeline.get_guidance_scale_embedding(
        None, torch.tensor(guidance_scale - 1).repeat(B), embedding_dim=W_DIM)
    gen, x_ref = torch.Generator().manual_seed(11), x.clone()
    with torch.no_grad():
        for t in ref.timesteps:
            eps = model(x_ref, t, encoder_hidden_states=ehs, timestep_cond=w_emb)
            x_ref, denoised = ref.step(eps, t, x_ref, generator=gen, return_dict=False)
    out = lcm_sample(model, x, sd, ref.timesteps, cond={"encoder_hidden_states": ehs}, w=guidance_scale - 1,
                     generator=torch.Generator().manual_seed(11), return_trajectory=True)
    assert out.nfe == n and len(out.trajectory) == n
    assert (out.x - denoised).abs().max() <= 1e-5
    assert denoised.abs().max() > 0.5
    other_w = lcm_sample(model, x, sd, ref.timesteps, cond={"encoder_hidden_states": ehs}, w=1.0,
                         generator=torch.Generator().manual_seed(11))
    assert (other_w.x - denoised).abs().max() > 1e-3  # the w input is live


def test_lcm_sample_bare_unet_relative(sd):
    """On the bare random UNet (x0 ~ 50 at t = 999) the agreement is float32 rounding: 1e-6 relative."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    unet = tiny_unet(time_cond_proj_dim=W_DIM, seed=4)
    x, ehs = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    ref = LCMScheduler(**SD_BETAS)
    ref.set_timesteps(4)
    w_emb = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.full((2,), 3.0), W_DIM)
    gen, x_ref = torch.Generator().manual_seed(5), x.clone()
    with torch.no_grad():
        for t in ref.timesteps:
            x_ref, denoised = ref.step(unet(x_ref, t, encoder_hidden_states=ehs, timestep_cond=w_emb).sample, t,
                                       x_ref, generator=gen, return_dict=False)
    out = lcm_sample(unet, x, sd, ref.timesteps, cond={"encoder_hidden_states": ehs}, w=3.0,
                     generator=torch.Generator().manual_seed(5))
    assert (out.x - denoised).abs().max() <= 1e-6 * denoised.abs().max()


# ---- LCD on the 2-D class-conditional mixture with its exact oracle teacher ---------------------------
WS = (0.0, 1.0, 3.0)
N_EVAL = 2000


@pytest.fixture(scope="module")
def toy(sd):
    """8 blobs on a ring, std 0.4, 4 classes of two neighbours each: classes overlap, so CFG has work to do."""
    ang = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8) + math.pi / 8
    mix = GaussianMixture(1.5 * torch.stack([ang.cos(), ang.sin()], 1),
                          covs=0.4 ** 2 * torch.eye(2, dtype=torch.float64).expand(8, 2, 2).clone())
    return mix, OracleEps(mix, sd)


def class_sw(x, labels, refs):
    """Sliced Wasserstein distance of each class's samples to a reference set of that class, averaged."""
    return sum(sliced_wasserstein(x[labels == c], refs[c]) for c in range(4)) / 4


def student_samples(model, sd, w, n_steps=2):
    labels = torch.arange(N_EVAL) % 4
    x = torch.randn(N_EVAL, 2, generator=torch.Generator().manual_seed(1))
    return lcm_sample(model, x, sd, lcm_timesteps(sd, n_steps), cond={"class_labels": labels}, w=w,
                      generator=torch.Generator().manual_seed(2)).x


def fresh_student(sd):
    torch.manual_seed(0)
    return ConsistencyModel(MLPDenoiser(hidden=128, depth=3, num_classes=4, time_cond_proj_dim=W_DIM), sd,
                            LCMScalings())


@pytest.fixture(scope="module")
def lcd_runs(sd, toy, tmp_path_factory):
    """k = 20 and k = 1 for 400 steps each from the same fresh student; then k = 20 resumed to 1000 steps."""
    mix, teacher = toy
    ckpt = tmp_path_factory.mktemp("lcd20")

    def run(k, steps, ckpt_dir=None):
        student = fresh_student(sd)
        loss = LatentConsistencyDistillation(teacher, student, k=k, w_min=0.0, w_max=3.0)
        res = train(student, loss, mix, TrainConfig(steps=steps, batch_size=256, lr=1e-3, progress=False,
                                                     ckpt_dir=str(ckpt_dir) if ckpt_dir else None))
        return res, copy.deepcopy(res.model)

    runs = {"untrained": (None, fresh_student(sd)), 20: run(20, 400, ckpt), 1: run(1, 400)}
    runs["long"] = run(20, 1000, ckpt)  # resumes from the 400-step checkpoint
    return runs


@pytest.mark.slow
def test_k1_and_k20_both_train(lcd_runs, sd, toy):
    mix, _ = toy
    labels = torch.arange(N_EVAL) % 4
    data = [mix.sample(N_EVAL // 4, torch.Generator().manual_seed(c), class_label=c)[0] for c in range(4)]
    sw = {name: class_sw(student_samples(m, sd, 0.0), labels, data) for name, (_, m) in lcd_runs.items()}
    print("2-step SW to the class data (w = 0):", {k: round(v, 3) for k, v in sw.items()})
    for k in (1, 20):
        losses = lcd_runs[k][0].losses
        first, last = sum(losses[:50]) / 50, sum(losses[-50:]) / 50
        print(f"k={k}: loss {first:.4f} -> {last:.4f}")
        assert last < 0.75 * first
        assert sw[k] < 0.95 * sw["untrained"]
    assert sw[20] < 0.3 * sw[1]  # the skipping step speeds distillation up (Luo et al. 2023, Sec. 4.3)
    assert sw["long"] < sw[20] < 2.0
    assert lcd_runs["long"][0].resumed_from == 400


@pytest.mark.slow
def test_class_sharpness_rises_with_w_like_the_teachers(lcd_runs, sd, toy):
    mix, teacher = toy
    labels = torch.arange(N_EVAL) % 4
    grid = skipping_timesteps(sd, 20).flip(0)
    z = torch.randn(N_EVAL, 2, generator=torch.Generator().manual_seed(9))
    T = {w: ddim(GuidedEps(teacher, ClassConditioning(4), w), z, sd, grid, cond={"class_labels": labels}).x
         for w in WS}  # the teacher's augmented PF-ODE, 50 guided DDIM steps
    S = {w: student_samples(lcd_runs["long"][1], sd, w) for w in WS}  # the student: 2 steps
    mis_t = [mix.misassigned_mass(T[w], labels) for w in WS]
    mis_s = [mix.misassigned_mass(S[w], labels) for w in WS]
    print("misassigned class mass, w =", WS, "teacher (50 steps):", [round(m, 4) for m in mis_t],
          "student (2 steps):", [round(m, 4) for m in mis_s])
    assert mis_t[0] > 3 * mis_t[1] > 9 * mis_t[2]
    assert mis_s[0] > 1.5 * mis_s[1] > 2.25 * mis_s[2]
    # the student follows the teacher's w: its samples at w lie nearer the teacher's at the same w
    sw = {(a, b): class_sw(S[a], labels, [T[b][labels == c] for c in range(4)]) for a in WS for b in WS}
    print("SW(student w=a, teacher w=b):", {k: round(v, 3) for k, v in sw.items()})
    assert sw[0.0, 0.0] < sw[0.0, 3.0] and sw[3.0, 3.0] < sw[3.0, 0.0]


def test_lcd_resume_equals_uninterrupted_and_checkpoints_no_teacher(sd, toy, tmp_path):
    from safetensors.torch import load_file

    mix, _ = toy

    def setup():
        torch.manual_seed(0)
        teacher = MLPDenoiser(hidden=32, depth=2, num_classes=4)  # a teacher with weights
        nn.init.normal_(teacher.out[-1].weight, std=0.3)
        student = lcm_student(teacher, sd, w_dim=8)
        return student, LatentConsistencyDistillation(teacher, student, k=50, w_min=1.0, w_max=4.0, mu=0.9)

    def cfg(path, steps):
        return TrainConfig(steps=steps, batch_size=32, lr=1e-3, seed=2, ckpt_dir=str(path), progress=False)

    full = train(*setup(), mix, cfg(tmp_path / "full", 8))
    student, loss = setup()
    train(student, loss, mix, cfg(tmp_path / "split", 4))
    student2, loss2 = setup()
    second = train(student2, loss2, mix, cfg(tmp_path / "split", 8))
    assert second.resumed_from == 4 and full.losses == second.losses
    for a, b in zip(full.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    saved_full = load_file(str(tmp_path / "full" / "state.safetensors"))
    saved_split = load_file(str(tmp_path / "split" / "state.safetensors"))
    target_keys = [k for k in saved_full if k.startswith("loss.target.")]
    assert target_keys and not any(k.startswith("loss.teacher.") for k in saved_full)
    for k in target_keys:  # the EMA target was restored and updated identically
        assert torch.equal(saved_full[k], saved_split[k])
    assert saved_full["loss.target.net.cond_proj.weight"].abs().sum() > 0  # it moved from its zero init


def test_guidance_distillation_loss_closed_form(sd, toy):
    """With a zero w projection the student's eps is the teacher's conditional eps at every w, so the loss is
    E[(sigma/alpha)^2 w^2 |eps_c - eps_u|^2] (eps_w - eps_c = w (eps_c - eps_u)); t, w, z drawn in that order."""
    mix, _ = toy
    torch.manual_seed(0)
    teacher = MLPDenoiser(hidden=32, depth=2, num_classes=4).eval()
    nn.init.normal_(teacher.out[-1].weight, std=0.3)
    student = lcm_student(teacher, sd, w_dim=8, w_init="zero")
    loss = GuidanceDistillation(teacher, student, ClassConditioning(4), w_min=0.5, w_max=3.0)
    x0, labels = mix.sample(64, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, sd.T, (64,), generator=g).double()
    w = 0.5 + 2.5 * torch.rand(64, generator=g)
    z = torch.randn(x0.shape, generator=g)
    a, s = sd.alpha(t).float()[:, None], sd.sigma(t).float()[:, None]
    x_t = a * x0 + s * z
    with torch.no_grad():
        eps_c = teacher(x_t, t.float(), class_labels=labels)
        eps_u = teacher(x_t, t.float(), class_labels=torch.full_like(labels, 4))
        expected = ((s / a) ** 2 * w[:, None] ** 2 * (eps_c - eps_u) ** 2).mean()
        got = loss(student, (x0, labels), generator=torch.Generator().manual_seed(0))
    assert expected > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    assert not any(k.startswith("teacher.") for k in loss.state_dict())
    with pytest.raises(ValueError, match="guidance input"):
        GuidanceDistillation(teacher, ConsistencyModel(teacher, sd, LCMScalings()), ClassConditioning(4))


def test_guidance_distillation_teaches_the_w_effect(sd, toy):
    """A fresh 2-D student trained by guidance distillation on the exact teacher moves its x0 with w as the guided
    teacher's x0 moves. The loss is weighted to x0 space, so far from the data (t = 900, 600) the error of its
    w-effect is a small fraction of the effect; nearer the data (t = 300) it is looser, and LCD takes over there."""
    mix, teacher = toy
    student = fresh_student(sd)
    loss = GuidanceDistillation(teacher, student, ClassConditioning(4), w_min=0.0, w_max=3.0)
    train(student, loss, mix, TrainConfig(steps=600, batch_size=256, lr=1e-3, progress=False))
    x0, labels = mix.sample(2000, torch.Generator().manual_seed(3))
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))
    errs = []
    for t in (900.0, 600.0, 300.0):
        tt = torch.full((2000,), t, dtype=torch.float64)
        x_t = q_sample(sd, x0, tt, z)

        def x0_of(eps):
            return (x_t - sd.sigma(tt).float()[:, None] * eps) / sd.alpha(tt).float()[:, None]

        with torch.no_grad():
            want = {w: x0_of(guided_eps(teacher, x_t, tt.float(), {"class_labels": labels},
                                        {"class_labels": torch.full_like(labels, 4)}, w)) for w in (0.0, 3.0)}
            got = {w: x0_of(student.net(x_t, tt.float(), class_labels=labels,
                                        timestep_cond=guidance_embedding(torch.full((2000,), w), W_DIM)))
                   for w in (0.0, 3.0)}
        effect = want[3.0] - want[0.0]
        errs.append(((got[3.0] - got[0.0] - effect).norm() / effect.norm()).item())
    print("relative error of the student's w-effect at t = 900 / 600 / 300:", [round(e, 3) for e in errs])
    assert errs[0] < 0.15 and errs[1] < 0.2 and errs[2] < 0.6
