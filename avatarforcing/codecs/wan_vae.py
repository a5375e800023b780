"""The Wan2.1 VAE through diffusers' ``AutoencoderKLWan`` (pinned: diffusers 0.42), with a decoder
cache that persists across calls, so a stream decoded block by block equals the full decode."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from ..checkpoints import StateDict, load_into, read_state_dict
from ..errors import CheckpointError


def original_vae_to_diffusers(sd: StateDict, num_res_blocks: int = 2) -> StateDict:
    """Rename a ``Wan2.1_VAE.pth`` state dict (original layout) to diffusers' ``AutoencoderKLWan`` names."""
    res = {"residual.0.gamma": "norm1.gamma", "residual.2": "conv1", "residual.3.gamma": "norm2.gamma",
           "residual.6": "conv2", "shortcut": "conv_shortcut"}

    def resnet(rest: str) -> str:
        for a, b in res.items():
            if rest.startswith(a):
                return b + rest[len(a):]
        return rest

    out: StateDict = {}
    per_stage = num_res_blocks + 2  # decoder: (num_res_blocks + 1) resnets + an upsampler per stage
    for k, v in sd.items():
        m = re.match(r"(encoder|decoder)\.middle\.(\d)\.(.+)$", k)
        if m:
            part, i, rest = m.groups()
            i = int(i)
            name = f"{part}.mid_block.attentions.0.{rest}" if i == 1 else \
                f"{part}.mid_block.resnets.{i // 2}.{resnet(rest)}"
        elif re.match(r"(encoder|decoder)\.head\.", k):
            name = re.sub(r"head\.0\.", "norm_out.", re.sub(r"head\.2\.", "conv_out.", k))
        elif re.match(r"(encoder|decoder)\.conv1\.", k):
            name = k.replace(".conv1.", ".conv_in.")
        elif k.startswith("conv1."):
            name = "quant_conv." + k[6:]
        elif k.startswith("conv2."):
            name = "post_quant_conv." + k[6:]
        elif k.startswith("encoder.downsamples."):
            j, rest = re.match(r"encoder\.downsamples\.(\d+)\.(.+)$", k).groups()
            name = f"encoder.down_blocks.{j}.{resnet(rest)}"
        elif k.startswith("decoder.upsamples."):
            j, rest = re.match(r"decoder\.upsamples\.(\d+)\.(.+)$", k).groups()
            stage, within = divmod(int(j), per_stage)
            if rest.startswith(("resample.", "time_conv.")):
                name = f"decoder.up_blocks.{stage}.upsamplers.0.{rest}"
            else:
                name = f"decoder.up_blocks.{stage}.resnets.{within}.{resnet(rest)}"
        else:
            name = k
        out[name] = v
    return out


def _original_shape(sd: StateDict, source: str) -> dict:
    """base_dim and z_dim of an original-layout VAE file (96 and 16 for Wan2.1; tests use tiny ones). The
    latent normalisation constants are diffusers' Wan2.1 ones for z_dim 16, identity otherwise."""
    try:
        base_dim, z_dim = sd["encoder.conv1.weight"].shape[0], sd["conv2.weight"].shape[0]
    except KeyError:
        raise CheckpointError(f"{source}: no encoder.conv1 / conv2 weights: does not match the original Wan2.1 "
                              f"VAE layout") from None
    if z_dim == 16:
        return {"base_dim": base_dim}
    return {"base_dim": base_dim, "z_dim": z_dim, "latents_mean": [0.0] * z_dim, "latents_std": [1.0] * z_dim}


class WanVAE:
    spatial_stride = 8
    temporal_stride = 4

    def __init__(self, vae):
        self.vae = vae.eval()
        cfg = vae.config
        self.latent_channels = cfg.z_dim
        p = next(vae.parameters())
        self.mean = torch.tensor(cfg.latents_mean, device=p.device, dtype=p.dtype).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(cfg.latents_std, device=p.device, dtype=p.dtype).view(1, -1, 1, 1, 1)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> WanVAE:
        """A diffusers ``vae`` folder, or the original ``Wan2.1_VAE.pth``."""
        from diffusers import AutoencoderKLWan

        path = Path(path)
        if path.is_dir():
            vae = AutoencoderKLWan.from_pretrained(str(path), torch_dtype=dtype)
        else:
            sd = read_state_dict(path)
            vae = AutoencoderKLWan(**_original_shape(sd, str(path)))  # Wan2.1: base_dim 96, z_dim 16
            conv = original_vae_to_diffusers(sd)
            try:
                load_into(vae, conv, str(path))
            except CheckpointError as e:
                raise CheckpointError(f"{e} (read as the original Wan2.1 VAE layout)") from None
            if dtype != torch.float32:
                vae = vae.to(dtype)
        return cls(vae.to(device))

    def train(self, mode: bool = True):
        self.vae.train(mode)
        return self

    def eval(self):
        return self.train(False)

    @torch.no_grad()
    def encode_video(self, frames: Tensor) -> Tensor:
        z = self.vae.encode(frames).latent_dist.mode()
        return (z - self.mean) / self.std

    def encode_image(self, image: Tensor) -> Tensor:
        return self.encode_video(image[:, :, None])

    def stream_decoder(self) -> WanStreamingDecoder:
        return WanStreamingDecoder(self)

    def decode(self, latents: Tensor) -> Tensor:
        return self.stream_decoder().decode(latents)


class WanStreamingDecoder:
    """Drives diffusers' decoder one latent frame at a time with our own persistent causal cache."""

    def __init__(self, wan: WanVAE):
        self.wan = wan
        vae = wan.vae
        vae.clear_cache()  # only to learn the number of cached convs
        self.feat_map = [None] * len(vae._feat_map)
        self.first = True

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        vae = self.wan.vae
        x = vae.post_quant_conv(latents * self.wan.std + self.wan.mean)
        outs = []
        for i in range(x.shape[2]):
            out = vae.decoder(x[:, :, i:i + 1], feat_cache=self.feat_map, feat_idx=[0], first_chunk=self.first)
            self.first = False
            outs.append(out)
        return torch.cat(outs, dim=2).clamp(-1, 1)
