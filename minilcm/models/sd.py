"""Stable-Diffusion-shaped parts built from configs, with no network: a CLIP tokenizer and text encoder, an
AutoencoderKL and a UNet2DConditionModel, at any size from "tiny" (tests) to the Chapter 5 mini-SD.

    build_tokenizer(words)           a CLIPTokenizer whose BPE vocabulary spells ``words`` as single tokens
    tiny_text_encoder(tokenizer)     a CLIPTextModel (random init) sized for the tokenizer
    minisd_vae(size)                 AutoencoderKL with f = 4: (B, 3, 32, 32) <-> (B, 4, 8, 8)
    minisd_unet(size, ...)           UNet2DConditionModel on 4-channel latents with cross-attention
    tiny_sd_pipeline(folder)         all of the above (tiny) + a scheduler, saved as a StableDiffusionPipeline folder
    sd15_shaped(device="meta")       SD v1.5's UNet, VAE and text encoder: its shapes, random (or no) weights
    CAPTION_TEMPLATES, caption(c)    the course's captions of a CIFAR-10 class ("a photo of a cat")

Stable Diffusion v1.5 is the same family at scale: f = 8 (64x64x4 latents for 512 px), a 123M-parameter CLIP
ViT-L/14 text encoder (77 x 768 states) and an 860M-parameter UNet.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..datasets import CIFAR10_CLASSES

CAPTION_TEMPLATES = ("a photo of a {}", "a picture of a {}", "an image of a {}", "a small photo of the {}")
EXTRA_WORDS = ("car", "plane", "boat", "lorry", "kitten", "puppy", "pony", "toad", "bike", "blurry", "good", "bad")


def caption(class_index: int, template: int = 0) -> str:
    """The caption of a CIFAR-10 class under one of the CAPTION_TEMPLATES."""
    return CAPTION_TEMPLATES[template].format(CIFAR10_CLASSES[class_index])


def class_caption_table() -> list[str]:
    """Every class's caption under every template, class-major: reshape embeddings to (10, templates, L, D)."""
    return [t.format(c) for c in CIFAR10_CLASSES for t in CAPTION_TEMPLATES]


def encode_prompts(tokenizer, text_encoder, prompts) -> torch.Tensor:
    """Text-encoder states (B, L, D) of prompts, padded to the tokenizer's max length as Stable Diffusion does."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids.to(text_encoder.device))[0].float()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters (the BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe(symbols: list[str], merges: list[tuple[str, str]]) -> list[str]:
    """Byte-pair encoding of one word: repeatedly apply the highest-priority (earliest) merge present."""
    rank = {m: i for i, m in enumerate(merges)}
    while len(symbols) > 1:
        pairs = [(rank.get(p, len(rank)), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
        r, i = min(pairs)
        if r == len(rank):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols


def course_words() -> list[str]:
    words = {w for t in CAPTION_TEMPLATES for w in t.format("").split()}
    words |= set(CIFAR10_CLASSES) | set(EXTRA_WORDS)
    return sorted(words)


def build_tokenizer(words=None, max_length: int = 16):
    """A CLIPTokenizer made offline: CLIP's byte-level alphabet (so any text encodes) plus BPE merges that make
    each of ``words`` (default: the course's caption words) one token. Padded with <|endoftext|> to
    ``max_length`` tokens, as Stable Diffusion's tokenizer pads to 77."""
    from transformers import CLIPTokenizer

    alphabet = list(_bytes_to_unicode().values())
    vocab = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    for w in (words if words is not None else course_words()):
        chars = [_bytes_to_unicode()[b] for b in w.lower().encode()]
        pieces = _bpe(chars[:-1] + [chars[-1] + "</w>"], merges)  # what the merges so far make of it
        cur = pieces[0]
        for s in pieces[1:]:  # then join those pieces left to right with new, lower-priority merges
            merges.append((cur, s))
            cur = cur + s
            if cur not in vocab:
                vocab.append(cur)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    tok = CLIPTokenizer(vocab={v: i for i, v in enumerate(vocab)}, merges=merges,
                        model_max_length=max_length)
    return tok


def tiny_text_encoder(tokenizer, hidden: int = 64, layers: int = 2, heads: int = 2, seed: int = 0):
    """A randomly initialised CLIPTextModel for ``tokenizer`` (hidden states (B, L, hidden))."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         max_position_embeddings=tokenizer.model_max_length,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return CLIPTextModel(cfg).eval()


VAE_SIZES = {"tiny": (16, 32, 32), "mini": (32, 64, 64)}
UNET_SIZES = {  # block_out_channels, layers_per_block, attention head dim
    "tiny": ((16, 32), 1, 8),
    "mini": ((64, 128), 2, 32),
}


def minisd_vae(size: str = "mini", sample_size: int = 32):
    """AutoencoderKL with 3 resolutions, so f = 2^(3-1) = 4: (B, 3, 32, 32) -> (B, 4, 8, 8) latents."""
    from diffusers import AutoencoderKL

    ch = VAE_SIZES[size]
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=ch, layers_per_block=1,
                         latent_channels=4, norm_num_groups=min(32, ch[0]), sample_size=sample_size)


def minisd_unet(size: str = "mini", cross_attention_dim: int = 64, sample_size: int = 8,
                time_cond_proj_dim: int | None = None):
    """A UNet2DConditionModel on (B, 4, sample_size, sample_size) latents, cross-attending to text states
    (B, L, cross_attention_dim); ``time_cond_proj_dim`` adds the LCM w-embedding input."""
    from diffusers import UNet2DConditionModel

    ch, layers, head = UNET_SIZES[size]
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=ch, layers_per_block=layers,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=head, norm_num_groups=min(32, ch[0]),
        time_cond_proj_dim=time_cond_proj_dim)


def sd_scheduler(kind: str = "ddim"):
    """Stable Diffusion's noise schedule (scaled_linear 0.00085 -> 0.012, 1000 steps) as a diffusers scheduler."""
    from diffusers import DDIMScheduler, LCMScheduler

    kw = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
              clip_sample=False, set_alpha_to_one=False, timestep_spacing="leading", steps_offset=1)
    return {"ddim": DDIMScheduler, "lcm": LCMScheduler}[kind](**kw)


def assemble_pipeline(unet, vae, text_encoder, tokenizer, scheduler=None):
    """A diffusers StableDiffusionPipeline from parts (no safety checker: these are course models)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler or sd_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def tiny_sd_pipeline(folder: str | Path | None = None, seed: int = 0, time_cond_proj_dim: int | None = None):
    """A random-weight, SD-shaped pipeline small enough for CPU tests; saved to ``folder`` when given, so that
    ``StableDiffusionPipeline.from_pretrained(folder)`` loads it with no network."""
    tok = build_tokenizer()
    te = tiny_text_encoder(tok, hidden=32, seed=seed)
    torch.manual_seed(seed)
    pipe = assemble_pipeline(minisd_unet("tiny", cross_attention_dim=32, time_cond_proj_dim=time_cond_proj_dim),
                             minisd_vae("tiny"), te, tok)
    if folder is not None:
        pipe.save_pretrained(str(folder))
    return pipe


# SD v1.5's shapes (the configs in stable-diffusion-v1-5/stable-diffusion-v1-5): diffusers' UNet2DConditionModel
# defaults are SD v1.x's blocks (widths 320/640/1280/1280, two layers each, 8 heads)
SD15_UNET = dict(cross_attention_dim=768, sample_size=64)
SD15_VAE = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512, scaling_factor=0.18215)
SD15_TEXT_ENCODER = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")  # ViT-L/14


def sd15_shaped(device="meta", tokenizer=None) -> dict:
    """{"unet", "vae", "text_encoder"}: Stable Diffusion v1.5's networks with random weights, built on ``device``
    ("meta": shapes only, no storage; count parameters and FLOPs of the 860M-parameter UNet in milliseconds).

    The UNet2DConditionModel has block widths 320/640/1280/1280 and cross-attends to 768-wide states of 64x64x4
    latents; the AutoencoderKL has f = 8 (512 px <-> 64x64); the CLIP ViT-L/14 text encoder gives 77 x 768 states.
    ``tokenizer`` (e.g. ``build_tokenizer(max_length=77)``, offline) sizes the text encoder's vocabulary and
    special tokens to it (SD's own: 49408 tokens). The networks are built in that order (unet, vae, text
    encoder), so one seed fixes all three; ``minilcm.lcm.lcm_student`` adds the LCM w-embedding input to the UNet."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text = dict(SD15_TEXT_ENCODER)
    if tokenizer is not None:
        text.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text)).eval()
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder}
