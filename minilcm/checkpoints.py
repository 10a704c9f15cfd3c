"""Checkpoints: safetensors for every tensor, a JSON file for everything else; the shipped-weights registry.

A checkpoint is a folder:
    state.safetensors   model.*, ema.*, optim.*, rng.* (and loss.* for losses with state)
    config.json         model config, step, optimizer hyper-parameters, loss history, ...
The metadata is also stored inside the safetensors header, so one rename commits a checkpoint: an interrupted
save leaves the previous checkpoint or the new one, never a mismatched pair.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .errors import UserError, one_line

STATE, CONFIG = "state.safetensors", "config.json"
META_KEY = "minilcm_config"  # the JSON metadata, inside the safetensors header
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "data" / "checkpoints"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit the model it is loaded into."""


def model_config(model: torch.nn.Module) -> dict:
    """A JSON description of an architecture: its class and its ``config`` (our models and diffusers' have one)."""
    cfg = getattr(model, "config", None)
    cfg = dict(cfg) if cfg is not None else {}
    return json.loads(json.dumps({"class": type(model).__name__, **cfg}, default=str))


def save_checkpoint(path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write ``tensors`` and ``meta`` to the folder ``path`` as ONE unit.

    The metadata travels inside the safetensors header, so the single ``os.replace`` of ``state.safetensors`` is
    the commit point: a kill at any instant leaves the previous checkpoint or the new one, never a mix.
    ``config.json`` is a readable copy written after it (``load_checkpoint`` trusts the header)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    text = json.dumps(meta, indent=1)
    atomic_write(path / STATE, lambda tmp: save_file(flat, str(tmp), metadata={META_KEY: text}))
    atomic_write(path / CONFIG, lambda tmp: tmp.write_text(text))
    return path


def atomic_write(target: Path, write) -> None:
    """``write(tmp)`` then rename ``tmp`` onto ``target``; on any failure (disk full, Ctrl-C) the temporary file
    is removed, so no partial file survives. ``tmp`` keeps ``target``'s suffix (savefig and np.savez read it)."""
    target = Path(target)
    tmp = target.with_name(f".{target.stem}.{os.getpid()}.partial{target.suffix}")
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_meta(folder, meta: dict) -> Path:
    """Write a model folder's ``meta.json`` (its provenance, metrics and benchmark rows) atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "meta.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=1, default=str)))
    return folder / "meta.json"


def update_meta(folder, updates: dict) -> Path:
    """Merge ``updates`` into a folder's ``meta.json`` (top-level keys replaced), atomically."""
    f = Path(folder) / "meta.json"
    meta = json.loads(f.read_text()) if f.exists() else {}
    return write_meta(folder, {**meta, **updates})


def load_checkpoint(path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint folder written by :func:`save_checkpoint` (or an older one with only config.json)."""
    path = Path(path)
    if not (path / STATE).exists():
        raise CheckpointError(f"no checkpoint in {path}: expected {STATE} there")
    try:
        with safe_open(str(path / STATE), framework="pt") as f:
            header = (f.metadata() or {}).get(META_KEY)
        if header is None and not (path / CONFIG).exists():
            raise CheckpointError(f"the checkpoint in {path} has no {CONFIG} (and no metadata in {STATE}); delete "
                                  "the folder to start afresh")
        tensors = load_file(str(path / STATE))
        return tensors, json.loads(header if header is not None else (path / CONFIG).read_text())
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"the checkpoint in {path} is unreadable ({one_line(e, 200, with_type=True)}); "
                              "delete the folder to start afresh") from e


def prefixed(sd: dict, prefix: str) -> dict:
    return {f"{prefix}.{k}": v for k, v in sd.items()}


def unprefixed(tensors: dict, prefix: str) -> dict:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def _architecture(cfg):
    """A config without diffusers' private bookkeeping keys ("_use_default_values" is built from a set, so its
    order changes from process to process); what remains describes the architecture."""
    if isinstance(cfg, dict):
        return {k: _architecture(v) for k, v in cfg.items() if not str(k).startswith("_")}
    return cfg


def _differences(a, b, key: str = "") -> list[str]:
    """'key: saved vs this' for every leaf where two configs differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(k, "<none>"), b.get(k, "<none>"), f"{key}.{k}" if key else str(k))
        return out
    return [] if a == b else [f"{key}: checkpoint {a} vs this model {b}"]


def load_into(model: torch.nn.Module, sd: dict, saved_config: dict | None, where: str) -> None:
    """Load a state dict, failing with a message that names both architectures when they differ."""
    mine = model_config(model)
    if saved_config is not None and _architecture(saved_config) != _architecture(mine):
        diff = "; ".join(_differences(_architecture(saved_config), _architecture(mine))[:3])
        raise CheckpointError(
            f"the checkpoint in {where} was written by a different architecture ({diff}).\n"
            "Build the model with the checkpoint's config, or use another folder (delete it to start afresh).")
    own = model.state_dict()
    bad = sorted(k for k in sd if k not in own or own[k].shape != sd[k].shape)
    missing = sorted(k for k in own if k not in sd)
    if bad or missing:
        raise CheckpointError(f"the checkpoint in {where} does not fit this model: "
                              f"{len(bad)} unexpected or mis-shaped tensors (e.g. {bad[:3]}), "
                              f"{len(missing)} missing (e.g. {missing[:3]}). Build the model the checkpoint was "
                              "trained with, or start afresh in another folder.")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()})


# ---- small exported models -------------------------------------------------------------------
def save_model(model: torch.nn.Module, path, dtype=torch.float16, **meta) -> Path:
    """Export a model's weights (fp16 by default) with its config and any metadata (metrics, steps, ...)."""
    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    return save_checkpoint(path, prefixed(sd, "model"), {"model_config": model_config(model), **meta})


def load_model(model: torch.nn.Module, path, use_ema: bool = True) -> dict:
    """Load weights into ``model`` from an exported model or a training checkpoint (its EMA by default).

    Returns the checkpoint's metadata.
    """
    tensors, meta = load_checkpoint(resolve(path))
    sd = unprefixed(tensors, "ema") if use_ema and any(k.startswith("ema.") for k in tensors) else {}
    load_into(model, sd or unprefixed(tensors, "model"), meta.get("model_config"), str(path))
    return meta


def resolve(name_or_path) -> Path:
    """A folder path as given, or the name of a shipped checkpoint under data/checkpoints/."""
    p = Path(name_or_path)
    if p.exists():
        return p
    shipped = shipped_dir() / str(name_or_path)
    if shipped.exists():
        return shipped
    names = ", ".join(sorted(available())) or "none yet"
    if os.sep in str(name_or_path) or str(name_or_path).startswith("."):
        raise CheckpointError(f"no checkpoint folder at {name_or_path}: check the path, or use a shipped name "
                              f"({names})")
    raise CheckpointError(f"no shipped checkpoint named {name_or_path!r} (shipped: {names}): pass a folder path, "
                          "or train it with the course's recipe (`minilcm train STAGE`)")


def shipped_dir() -> Path:
    """Where shipped checkpoints are looked up by name: $MINILCM_CHECKPOINTS, else data/checkpoints of the repo."""
    return Path(os.environ.get("MINILCM_CHECKPOINTS") or SHIPPED_DIR)


def available() -> list[str]:
    """Names of the checkpoints shipped under data/checkpoints/ (pipeline folders included)."""
    d = shipped_dir()
    if not d.exists():
        return []
    return sorted(p.name for p in d.iterdir() if not p.name.startswith(".") and (
                  (p / STATE).exists() or (p / "model_index.json").exists() or (p / "unet").is_dir()))


# ---- provenance and safe exports ---------------------------------------------------------------------
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".npz")


def content_hash(folder) -> str:
    """sha256 of every weight file below ``folder`` (relative names and bytes; configs and metadata left out, so
    re-writing a meta.json does not change it): which teacher a student was distilled from."""
    folder = Path(folder)
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES
                    and not p.name.startswith(".")):
        h.update(str(f.relative_to(folder)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def is_shipped(path) -> bool:
    """True when ``path`` is, or lies inside, the shipped-checkpoint folder (data/checkpoints or
    $MINILCM_CHECKPOINTS)."""
    p = Path(path).resolve()
    for d in {SHIPPED_DIR.resolve(), shipped_dir().resolve()}:
        if p == d or d in p.parents:
            return True
    return False


def default_export(name: str) -> Path:
    """Where a recipe stage exports when no ``--out`` is given: ``runs/<name>`` (never the shipped folder)."""
    return Path("runs") / name


EXPORT_MARKERS = (STATE, "meta.json", "model_index.json", "unet", "vae")


def check_export(out, replace_shipped: bool = False, what: str = "") -> Path:
    """Refuse to write into a shipped checkpoint unless ``replace_shipped`` says so, and refuse an ``out`` that an
    export would wipe without being one: a folder that holds the shipped folder or the working directory, or an
    existing non-empty folder with no export in it (``--out runs`` would otherwise replace all of runs/)."""
    out = Path(out)
    r = out.resolve()
    if is_shipped(out) and not replace_shipped:
        raise CheckpointError(f"{out} is a shipped checkpoint{' (' + what + ')' if what else ''}: the recipe does "
                              "not replace it by default. Pass --replace-shipped to replace it, or --out to write "
                              "elsewhere.")
    for inside in {SHIPPED_DIR.resolve(), shipped_dir().resolve(), Path.cwd().resolve()}:
        if r == inside or r in inside.parents:
            raise CheckpointError(f"--out {out} holds {inside}: an export replaces its whole folder; name a new "
                                  "folder, e.g. runs/my-model")
    if out.is_file():
        raise CheckpointError(f"--out {out} is a file: name a folder")
    if out.is_dir() and any(out.iterdir()) and not any((out / m).exists() for m in EXPORT_MARKERS):
        raise CheckpointError(f"--out {out} is a folder that holds no exported model: an export replaces its whole "
                              "folder; name a new folder, or an earlier export to replace")
    return out


class staged_folder:
    """Write a folder as a unit: ``with staged_folder(out) as tmp: ...write into tmp...``; on success ``tmp``
    replaces ``out`` (the old one is removed after the swap), on failure ``tmp`` is deleted and ``out`` is
    untouched. ``keep``: names inside an existing ``out`` to carry over into the new one (e.g. ``vae`` when
    only the UNet is retrained)."""

    def __init__(self, out, keep: tuple = ()):
        self.out, self.keep = Path(out), keep

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.with_name(f".{self.out.name}.{os.getpid()}.partial")
        for stale in self.out.parent.glob(f".{self.out.name}.*.partial"):  # left by a killed export
            shutil.rmtree(stale, ignore_errors=True)
        self.tmp.mkdir()
        for k in self.keep:
            if (self.out / k).exists():
                (shutil.copytree if (self.out / k).is_dir() else shutil.copy2)(self.out / k, self.tmp / k)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = self.out.with_name(f".{self.out.name}.{os.getpid()}.old")
        moved = False
        try:
            if self.out.exists():
                os.replace(self.out, old)
                moved = True
            os.replace(self.tmp, self.out)
        except BaseException:  # put the old folder back: out is never left missing
            if moved and not self.out.exists():
                os.replace(old, self.out)
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return False


def strip_machine_paths(folder) -> None:
    """Remove diffusers' ``_name_or_path`` (the absolute path of the machine that saved it) from every
    config.json below ``folder``."""
    for f in Path(folder).rglob("config.json"):
        try:
            cfg = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(cfg, dict) and "_name_or_path" in cfg:
            cfg.pop("_name_or_path")
            f.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# ---- diffusers folders -------------------------------------------------------------------------------
def resolve_folder(name_or_path, marker: str, how: str) -> Path:
    """A shipped folder name or a path, checked for ``marker``; a clear error naming the fix otherwise."""
    try:
        path = resolve(name_or_path)
    except CheckpointError as e:
        raise CheckpointError(f"{e} ({how})") from None
    if not (path / marker).exists():
        raise CheckpointError(f"{path} has no {marker}: it is not a complete checkpoint ({how})")
    return path


def load_pretrained(cls, path: Path, what: str, **kw):
    """diffusers' ``from_pretrained`` with its failures (a truncated safetensors, a config of another width, a
    missing file) as one-line CheckpointErrors instead of 40-line tracebacks."""
    from diffusers.utils import logging as dlog  # diffusers only where a diffusers folder is loaded

    try:
        from transformers.utils import logging as tlog
    except ImportError:
        tlog = None
    bars = [m for m in (dlog, tlog) if m is not None and m.is_progress_bar_enabled()]
    for m in bars:
        m.disable_progress_bar()  # "Loading pipeline components": a small model loads in a blink
    try:
        return cls.from_pretrained(str(path), **kw)
    except Exception as e:
        msg = one_line(e, 1000)
        if "ignore_mismatched_sizes" in str(e) or "size mismatch" in str(e) or "shape" in msg:
            msg = "its weights do not fit its config.json (a config of another size?)"
        raise CheckpointError(f"the {what} in {path} cannot be loaded ({type(e).__name__}: {msg[:160]}); "
                              "re-export it with the recipe, or restore the folder") from e
    finally:
        for m in bars:
            m.enable_progress_bar()
