"""Image-caption data for distillation at Stable Diffusion scale, and its cache of latents and text embeddings.

    caption_pairs(source)               [(image path or PIL image, caption), ...] from a folder or a `datasets` name
    encode_pairs(pairs, pipe, res)      -> LatentCaptions: VAE latents z = scaling_factor * E(x) and text states c
    LatentCaptions(latents, embeds)     data(n, generator) -> (latents (n, 4, h, w), embeds (n, L, D)) for train()
    load_or_encode(source, pipe, ...)   the above, read from / written to a cache file when one is given

LCD never needs pixels or tokens inside the training step: the teacher, the student and the target all read the
latent z_0 = E(x) and the text states c (Luo et al. 2023, Algorithm 1). So both are computed ONCE, before training
(the reference script re-runs the VAE encoder and CLIP on every step). The cache keeps the posterior mean of
E(x); the reference script draws z ~ q(z|x) each step, which differs from the mean by ~ 1e-2 of its scale in SD.

A folder follows Hugging Face's ImageFolder convention: images (png, jpg, jpeg, webp, bmp), anywhere below the
folder, with captions either in ``metadata.jsonl`` (one JSON object per line with ``file_name`` and ``text``,
or ``caption``) or in a ``.txt`` file of the same name next to each image.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoints import atomic_write
from ..errors import UserError, one_line
from ..models.sd import encode_prompts

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_KEYS = ("text", "caption", "prompt")


class DataError(UserError, ValueError):
    """The caption data is missing, empty, or has images without captions."""


def folder_pairs(folder: str | Path) -> list[tuple[Path, str]]:
    """(image path, caption) for every image below ``folder`` (ImageFolder convention, see the module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise DataError(f"no data folder {folder} (it {what}): check the path")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise DataError(f"the data folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}): put the images "
                        "and their captions there, or pass another folder")
    captions: dict[Path, str] = {}
    for meta in sorted(folder.rglob("metadata.jsonl")):
        captions.update(_read_metadata(meta))
    pairs, missing = [], []
    for p in images:
        side = p.with_suffix(".txt")
        text = captions.get(p.resolve())
        if text is None and side.is_file():
            text = _read_text(side).strip()
        (pairs.append((p, text)) if text is not None else missing.append(p))
    if missing:
        names = ", ".join(str(p.relative_to(folder)) for p in missing[:5])
        raise DataError(f"{len(missing)} of {len(images)} images in {folder} have no caption (e.g. {names}): add "
                        "them to metadata.jsonl ({\"file_name\": ..., \"text\": ...}) or write a .txt file beside each")
    return pairs


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): save it as UTF-8") from e


def _read_metadata(meta: Path) -> dict[Path, str]:
    """{resolved image path: caption} from one metadata.jsonl; a bad line is a DataError naming file and line."""
    example = '{"file_name": "img0.png", "text": "a photo of a cat"}'
    out = {}
    for i, line in enumerate(_read_text(meta).splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{meta}, line {i + 1}: not valid JSON ({e.msg}, column {e.colno}): write one object "
                            f"per line, e.g. {example}") from e
        if not isinstance(row, dict):
            raise DataError(f"{meta}, line {i + 1}: expected a JSON object, got {type(row).__name__}: write one "
                            f"object per line, e.g. {example}")
        key = next((k for k in CAPTION_KEYS if k in row), None)
        if "file_name" not in row or key is None:
            raise DataError(f"{meta}, line {i + 1}: need 'file_name' and one of {CAPTION_KEYS}, got {sorted(row)}")
        out[(meta.parent / str(row["file_name"])).resolve()] = str(row[key])
    return out


HUB_DATASET_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def looks_like_hub_id(name: str) -> bool:
    """``owner/name``: what a Hugging Face hub id looks like (a path starting with / . or ~ does not)."""
    return HUB_DATASET_ID.fullmatch(name) is not None


def hub_pairs(name: str, split: str = "train", image_column: str = "image", caption_column: str | None = None,
              max_samples: int | None = None) -> list:
    """(PIL image, caption) rows of a Hugging Face ``datasets`` dataset (imported only here; may need network)."""
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"no data folder {name}: check the path (to read {name!r} as a Hugging Face dataset: "
                        "pip install datasets)") from e
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, no such dataset, no such split, gated, ...: 20-40 lines of text
        raise DataError(f"no data folder {name}, and it could not be loaded as a Hugging Face dataset "
                        f"({type(e).__name__}: {one_line(e)}): check the path; a hub dataset needs network "
                        "access (and a valid --split)") from e
    col = caption_column or next((k for k in CAPTION_KEYS if k in ds.column_names), None)
    if col is None or image_column not in ds.column_names:
        raise DataError(f"dataset {name!r} has columns {ds.column_names}: pass image_column / caption_column")
    if max_samples:
        ds = ds.select(range(min(max_samples, len(ds))))
    return [(row[image_column], str(row[col])) for row in ds]


def caption_pairs(source, **hub_kwargs) -> list:
    """A folder (if ``source`` is an existing directory, or looks like a path), a `datasets` name (``owner/name``),
    or a list of (image, caption) pairs (returned as it is)."""
    if isinstance(source, list):
        return source
    name = str(source)
    p = Path(name).expanduser()
    if p.exists() or isinstance(source, Path) or not looks_like_hub_id(name):
        if not p.exists():
            raise DataError(f"no data folder {name} (and it is not a Hugging Face dataset name): check the path")
        return folder_pairs(p)
    return hub_pairs(name, **hub_kwargs)


def load_image(image, resolution: int) -> torch.Tensor:
    """An image (path or PIL) as (3, res, res) in [-1, 1]: shorter side resized to ``resolution``, centre crop."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    try:
        img = image if isinstance(image, Image.Image) else Image.open(image)
        img = TF.center_crop(TF.resize(img.convert("RGB"), resolution, antialias=True), resolution)
    except (OSError, ValueError, SyntaxError) as e:  # PIL: UnidentifiedImageError, truncated files, bad headers
        raise DataError(f"cannot read the image {image} ({type(e).__name__}: {one_line(e)}): "
                        "replace it or remove it from the data folder") from e
    return TF.to_tensor(img) * 2 - 1


def text_states(pipe, prompts: list[str]) -> torch.Tensor:
    """``minilcm.models.sd.encode_prompts`` with a pipeline's tokenizer and text encoder, on the CPU: the last hidden
    states (N, L, D), prompts padded to the tokenizer's length (77 in SD)."""
    return encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts).cpu()


@dataclass
class LatentCaptions:
    """Cached training data: latents (N, 4, h, w) (already times the VAE's scaling_factor), text states (N, L, D)
    and the empty prompt's states (L, D) for the unconditional branch. ``data(n, generator)`` draws a batch."""

    latents: torch.Tensor
    embeds: torch.Tensor
    empty: torch.Tensor

    def __len__(self):
        return len(self.latents)

    def __call__(self, n: int, generator: torch.Generator | None = None):
        idx = torch.randint(0, len(self), (n,), generator=generator)
        return self.latents[idx].float(), self.embeds[idx].float()

    def save(self, path):
        from safetensors.torch import save_file

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(path), lambda tmp: save_file({"latents": self.latents.contiguous(),
                                                        "embeds": self.embeds.contiguous(),
                                                        "empty": self.empty.contiguous()}, str(tmp)))

    @classmethod
    def load(cls, path) -> LatentCaptions:
        from safetensors.torch import load_file

        try:
            t = load_file(str(path))
            return cls(t["latents"], t["embeds"], t["empty"])
        except Exception as e:  # not a safetensors file, truncated, or another file's tensors
            what = f"no tensor {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {one_line(e)}"
            raise DataError(f"the cache {path} is not a latents cache written by sd-distill ({what}): delete it or "
                            "pass another --cache file") from e


@torch.no_grad()
def encode_pairs(pairs, pipe, resolution: int, batch: int = 8, progress: bool = False) -> LatentCaptions:
    """Encode every image with the pipeline's VAE (posterior mean x scaling_factor) and every caption with its text
    encoder; text states are kept in fp16 (half the memory; the UNet runs in bf16/fp16 on a GPU anyway)."""
    from tqdm.auto import tqdm

    vae = pipe.vae
    dev, dt = vae.device, vae.dtype
    zs = []
    for i in tqdm(range(0, len(pairs), batch), desc="encode images", disable=not progress, leave=False):
        x = torch.stack([load_image(img, resolution) for img, _ in pairs[i:i + batch]])
        zs.append(vae.encode(x.to(dev, dt)).latent_dist.mean.float().cpu())
    latents = (torch.cat(zs) * vae.config.scaling_factor).contiguous()  # the VAE may hand back channels_last
    embeds = torch.cat([text_states(pipe, [c for _, c in pairs[i:i + batch]]) for i in range(0, len(pairs), batch)])
    return LatentCaptions(latents, embeds.half(), text_states(pipe, [""])[0])


def vae_scale_factor(pipe) -> int:
    """f: pixels per latent side (8 for SD: 512 px -> 64x64 latents)."""
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def check_cache(data: LatentCaptions, pipe, resolution: int, cache) -> LatentCaptions:
    """``data`` (read from ``cache``) if it fits this teacher at ``resolution``, else a DataError."""
    side, dim = resolution // vae_scale_factor(pipe), pipe.text_encoder.config.hidden_size
    if data.latents.shape[-1] != side or data.embeds.shape[-1] != dim:
        raise DataError(f"the cache {cache} holds {tuple(data.latents.shape[1:])} latents and "
                        f"{data.embeds.shape[-1]}-wide text states; this teacher at {resolution} px needs "
                        f"{side}x{side} latents and {dim}-wide states: delete the cache or pass another file")
    return data


def load_or_encode(source, pipe, resolution: int, cache=None, progress: bool = False, **hub_kwargs):
    """Read ``cache`` if it exists (checked against this teacher and resolution), else encode ``source`` (a folder,
    a `datasets` name or a list of (image, caption) pairs) and write ``cache`` when given."""
    if cache is not None and Path(cache).exists():
        return check_cache(LatentCaptions.load(cache), pipe, resolution, cache)
    data = encode_pairs(caption_pairs(source, **hub_kwargs), pipe, resolution, progress=progress)
    if cache is not None:
        data.save(cache)
    return data
