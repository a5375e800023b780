"""Which codecs a model uses, chosen in one place from its config: the audio front end and the VAE.

    codec.audio: mel (+ codec.listener: mel-adapter) -> MelFrontEnd (-> ListeningFrontEnd)   audio.py, listener.py
                 wav2vec2                            -> Wav2Vec2FrontEnd (a local folder)    audio.py
    codec.vae:   mini                                -> MiniVAE (vae.safetensors)            vae.py
                 wan                                 -> WanVAE (diffusers vae/ or .pth)      wan_vae.py
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import CodecConfig, Config
from ..errors import InputError
from .audio import MelFrontEnd, Wav2Vec2FrontEnd
from .vae import MiniVAE


def make_front_end(cfg: CodecConfig, model_dir: str | Path | None = None, folder: str | Path | None = None):
    """The configured front end; ``model_dir`` a wav2vec2 folder, ``folder`` the model folder (listener weights)."""
    if cfg.audio == "mel" and cfg.listener != "none":
        from .listener import ListeningFrontEnd

        if folder is None:
            raise InputError(f"codec.listener {cfg.listener!r} needs the model folder's listener.safetensors")
        return ListeningFrontEnd.load(cfg, Path(folder) / "listener.safetensors")
    if cfg.audio == "mel":
        return MelFrontEnd(cfg)
    if model_dir is None:
        raise InputError("the wav2vec2 front end needs a local model folder (facebook/wav2vec2-base-960h)")
    return Wav2Vec2FrontEnd(cfg, model_dir)


def load_vae(cfg: Config, source: str | Path, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32):
    """The configured VAE from a model folder (``vae.safetensors``; for wan its ``vae/`` or
    ``Wan2.1_VAE.pth``) or from the weights themselves (a .safetensors file; for wan a diffusers ``vae``
    folder or the original .pth)."""
    src = Path(source)
    model_folder = (src / "config.yaml").is_file()
    if cfg.codec.vae == "wan":
        from .wan_vae import WanVAE

        if model_folder:
            found = next((p for p in (src / "vae", src / "Wan2.1_VAE.pth") if p.exists()), None)
            if found is None:
                raise InputError(f"{src}: a wan model folder needs its VAE as {src / 'vae'}/ (diffusers) or "
                                 f"{src / 'Wan2.1_VAE.pth'}")
            src = found
        return WanVAE.load(src, device, dtype)
    file = src / "vae.safetensors" if src.is_dir() else src
    return MiniVAE.load(file, cfg.model.latent_channels, cfg.codec.vae_base_dim).to(device, dtype)
