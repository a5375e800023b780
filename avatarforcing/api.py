"""The Python API.

    avatar = Avatar.load("path/to/model")           # or Avatar.random("mini") for tests / benchmarks
    session = avatar.session("portrait.jpg", seed=0)
    for frames in session.push(pcm_chunk):          # float32 mono 16 kHz, any chunk size
        ...                                         # uint8 [n, H, W, 3], as soon as the look-ahead allows
    for frames in session.close(): ...              # drain
    video = avatar.generate("portrait.jpg", "speech.wav")   # offline: all frames
    video = avatar.generate("portrait.jpg", "speech.wav", prompt="A woman speaks calmly ...")  # text models
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .checkpoints import DTYPES, load_model
from .codecs.audio import check_pcm
from .codecs.factory import load_vae, make_front_end
from .codecs.text import Prompts
from .codecs.vae import MiniVAE
from .config import Config, preset
from .data.audio import load_audio
from .data.image import load_image, prepare_image, to_uint8
from .errors import InputError
from .model import AvatarDiT, fast
from .session import Framing, Session, Stats  # noqa: F401 - the API's names
from .stream.teacher import TeacherSampler
from .stream.window import Options, WindowSampler

MODES = ("avatarforcing", "ar", "teacher")
PACKAGE_MODELS = Path(__file__).parent / "assets" / "models"


COMPONENTS = "components.yaml"  # a model folder's references to encoders kept outside it


def read_components(folder: Path) -> dict[str, Path]:
    """``components.yaml``: paths of the wav2vec2 folder, the umT5 encoder and its tokenizer (relative paths are
    relative to the model folder)."""
    import yaml

    f = folder / COMPONENTS
    if not f.is_file():
        return {}
    data = yaml.safe_load(f.read_text()) or {}
    known = ("wav2vec2", "text_encoder", "tokenizer")
    if not isinstance(data, dict) or any(k not in known for k in data):
        raise InputError(f"{f}: expected a mapping with keys among {list(known)}")
    return {k: (folder / str(v)) if not Path(str(v)).is_absolute() else Path(str(v)) for k, v in data.items() if v}


def model_folder(name_or_path: str | Path) -> Path:
    """A model folder, or the folder of a shipped model of that name."""
    path = Path(name_or_path)
    if not path.exists() and (PACKAGE_MODELS / str(name_or_path)).exists():
        path = PACKAGE_MODELS / str(name_or_path)
    if not path.exists():
        shipped = sorted(p.name for p in PACKAGE_MODELS.glob("*")) if PACKAGE_MODELS.exists() else []
        raise InputError(f"{name_or_path}: no such model folder, and no shipped model of that name "
                         f"(shipped: {shipped or 'none yet: the trained mini model is not in this build'})")
    return path


def default_dtype(device: str | torch.device) -> str:
    """bf16 on a GPU (what the release runs), fp32 on the CPU."""
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


class Avatar:
    def __init__(self, model: AvatarDiT, vae, cfg: Config, device: str | torch.device = "cpu",
                 audio_model: str | Path | None = None, teacher: AvatarDiT | None = None,
                 prompts: Prompts | None = None, folder: str | Path | None = None):
        self.model, self.vae, self.cfg = model.eval(), vae.eval(), cfg
        self.teacher = teacher.eval() if teacher is not None else None  # the multi-step baseline's weights
        self.device = torch.device(device)
        self.front_end = make_front_end(cfg.codec, audio_model, folder)
        self.dtype = next(model.parameters()).dtype
        self.prompts = prompts or Prompts(cfg.model.text_len, cfg.model.text_dim, required=False)

    # ------------------------------------------------------------------ construction

    @classmethod
    def load(cls, name_or_path: str | Path, device: str = "cpu", audio_model: str | Path | None = None,
             dtype: str | None = None, overrides: dict | None = None, engine: str | None = None) -> Avatar:
        """A model folder (config.yaml, model.safetensors, VAE, optional components.yaml) or a shipped model's name.

        dtype: "fp32" | "bf16" | "fp16" for the DiT and the VAE (default: bf16 on a GPU, fp32 on the CPU).
        overrides: config fields to change for this run, e.g. ``{"codec.audio_lookahead_frames": 4}``.
        engine: the student's inference variant (model/fast.py: eager, compiled, graphs, fp8, joined with '+');
        default: compiled on CUDA, eager on the CPU.
        """
        path = model_folder(name_or_path)
        dtype = dtype or default_dtype(device)
        if dtype not in DTYPES:
            raise InputError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
        dt = DTYPES[dtype]
        model, cfg = load_model(path, device, dtype=dt)
        fast.engine(model, engine or fast.default_variant(device))
        if overrides:
            cfg = cfg.override(overrides)
        components = read_components(path)
        audio_model = audio_model or components.get("wav2vec2")
        vae = load_vae(cfg, path, device, dt)
        teacher = None
        if (path / "teacher.safetensors").is_file():
            teacher, _ = load_model(path, device, name="teacher.safetensors", dtype=dt)
        prompts = Prompts(cfg.model.text_len, cfg.model.text_dim, components.get("text_encoder"),
                          components.get("tokenizer"), folder=path)
        return cls(model, vae, cfg, device, audio_model, teacher, prompts, folder=path)

    @classmethod
    def random(cls, cfg: Config | str = "mini", seed: int = 0, device: str = "cpu",
               dtype: torch.dtype = torch.float32) -> Avatar:
        """Random weights: for tests and speed benchmarks only (the output is noise, not a face)."""
        cfg = preset(cfg) if isinstance(cfg, str) else cfg
        torch.manual_seed(seed)
        model = AvatarDiT(cfg.model).to(device, dtype)
        vae = MiniVAE(cfg.model.latent_channels, cfg.codec.vae_base_dim).to(device, dtype)
        return cls(model, vae, cfg, device, teacher=model)

    # ------------------------------------------------------------------ use

    @property
    def image_fit(self) -> str:
        """How a portrait is fitted to the frame: "square" (centre crop, mini) or "fit" (keep the aspect)."""
        return "square" if self.cfg.codec.vae == "mini" else "fit"

    def prepare_reference(self, image) -> Tensor:
        c = self.cfg.codec
        arr = prepare_image(load_image(image, exif_rotate=c.exif_rotate), c.height, c.width, mode=self.image_fit,
                            min_side=min(c.height, c.width) // 2, filter=c.image_filter,
                            name=str(image)[:200] if isinstance(image, str | Path) else "the portrait")
        return torch.from_numpy(arr)[None].to(self.device, self.dtype)

    @torch.no_grad()
    def reconstruct(self, frames: np.ndarray) -> np.ndarray:
        """Video frames uint8 [T, H, W, 3] at the model's size through its codec alone (encode, decode): what the
        latents keep, the ceiling of any DiT that generates them. Padded with its last frame to 1 + 4n frames
        (the codec's groups), trimmed back to T."""
        c = self.cfg.codec
        if frames.ndim != 4 or frames.shape[1:] != (c.height, c.width, 3) or frames.dtype != np.uint8:
            raise InputError(f"reconstruct needs uint8 [T, {c.height}, {c.width}, 3] frames, got {frames.dtype} "
                             f"{frames.shape}")
        t, s = len(frames), c.temporal_stride
        padded = np.concatenate([frames, np.repeat(frames[-1:], (-(t - 1)) % s, 0)])
        x = torch.from_numpy(padded).permute(3, 0, 1, 2)[None].to(self.device, self.dtype) / 127.5 - 1
        out = self.vae.decode(self.vae.encode_video(x))  # [1, 3, 1 + 4n, H, W]
        return to_uint8(out[0].transpose(0, 1).float().cpu().numpy())[:t]

    def context(self, prompt: str | None = None, prompt_embeds=None, streams: int = 1) -> Tensor | None:
        """Text context [streams, text_len, text_dim] on the model's device, or None (no text conditioning)."""
        ctx = self.prompts.context(prompt, prompt_embeds)
        return None if ctx is None else ctx.to(self.device, self.dtype).expand(streams, -1, -1)

    def load_audio(self, audio) -> np.ndarray:
        """A file (or bytes) at the model's rate with the configured resampler; arrays (mono float PCM at the
        model's rate) are checked and pass through. At least one video frame of audio is needed."""
        if isinstance(audio, np.ndarray):
            name, pcm = "audio", check_pcm(audio).numpy()
        else:
            name = str(audio) if isinstance(audio, str | Path) else "audio"
            pcm = load_audio(audio, self.cfg.codec.sample_rate, self.cfg.codec.resampler)
        spf, rate = self.cfg.codec.samples_per_frame, self.cfg.codec.sample_rate
        if len(pcm) < spf:
            raise InputError(f"{name}: the audio is {1000 * len(pcm) / rate:.1f} ms long; one video frame needs "
                             f"{1000 * spf / rate:.0f} ms")
        return pcm

    def session(self, image, seed: int = 0, mode: str = "avatarforcing", options: Options | None = None,
                prompt: str | None = None, prompt_embeds=None) -> Session:
        return Session(self, self.prepare_reference(image), seed, mode, options or Options(),
                       self.context(prompt, prompt_embeds))

    def live(self, image, seed: int = 0, prompt: str | None = None, prompt_embeds=None,
             grace_ms: float | None = None, mode: str = "avatarforcing", max_behind_ms: float = 1000.0):
        """An always-on session driven by a media clock (``live.LiveSession``): speech when it arrives,
        listening (silence) when it does not, ``interrupt()`` for barge-in; frames with their pts and PCM.
        ``max_behind_ms``: how far behind the clock compute may fall and still catch up; beyond, the clock
        slips (waits for compute)."""
        from .live import LiveSession

        return LiveSession(self, image, seed, prompt, prompt_embeds, grace_ms, mode, max_behind_ms)

    def lookahead_ms(self, window_blocks: int | None = None) -> float:
        """Algorithmic latency of a window of ``window_blocks`` blocks (default: the config's): the audio a frame
        waits for, the window's future blocks plus the front end's own look-ahead."""
        c = self.cfg
        frames = (window_blocks or c.stream.window_blocks) * c.stream.block_frames * c.codec.temporal_stride
        return 1000.0 * (frames * c.codec.samples_per_frame + self.front_end.lookahead_samples) / c.codec.sample_rate

    @property
    def clip_rows(self) -> bool:
        """Whether a file's audio rows are computed once over the whole clip (``codec.audio_rows: clip``)."""
        return self.cfg.codec.audio_rows == "clip" and not self.front_end.chunk_invariant

    def whole_clip(self, latent_frames: int | None = None) -> bool:
        """Whether a file must be generated offline, at once (the release's clip rows, or its fixed output
        length), rather than streamed block by block: the one place that decides."""
        return self.clip_rows or latent_frames is not None

    @property
    def framing(self) -> Framing:
        return Framing(self.cfg.stream.output == "release", self.cfg.codec.samples_per_frame)

    def pack_block(self, rows: Tensor) -> Tensor:
        """One block of audio rows [N, frames of a block, D] as the sampler takes them: [N, B, pack, D] per latent
        frame, on the model's device and dtype."""
        B, pack = self.cfg.stream.block_frames, self.cfg.model.audio_pack
        return rows.reshape(rows.shape[0], B, pack, -1).to(self.device, self.dtype)

    def push_block(self, sampler, rows: Tensor) -> list[Tensor]:
        """One block of audio rows [N, frames of a block, D] into the sampler (the block pump's one step); returns
        the latent blocks it emitted."""
        return sampler.push(self.pack_block(rows))

    def stream(self, image, audio, seed: int = 0, mode: str = "avatarforcing", options: Options | None = None,
               chunk: int = 16000, prompt: str | None = None, prompt_embeds=None) -> Iterator[np.ndarray]:
        """Frames for a whole audio file or array, yielded block by block."""
        pcm = self.load_audio(audio)
        s = self.session(image, seed, mode, options, prompt, prompt_embeds)
        for i in range(0, len(pcm), chunk):
            yield from s.push(pcm[i:i + chunk])
        yield from s.close()

    def generate(self, image, audio, seed: int = 0, mode: str = "avatarforcing", options: Options | None = None,
                 prompt: str | None = None, prompt_embeds=None, latent_frames: int | None = None) -> np.ndarray:
        """All frames for a speech file or array. With ``codec.audio_rows: clip`` (the release) the audio rows
        are computed once over the whole clip; ``latent_frames`` (release output only) fixes the length to the
        release's 1 + 4 (latent_frames - 1) frames, as its ``--num_output_frames``."""
        if self.whole_clip(latent_frames):
            return self.generate_batch([image], [audio], [seed], mode, options, prompt, prompt_embeds,
                                       latent_frames)[0]
        frames = list(self.stream(image, audio, seed, mode, options, prompt=prompt, prompt_embeds=prompt_embeds))
        return np.concatenate(frames) if frames else np.zeros((0,), np.uint8)

    def sampler(self, mode: str, ref_latent: Tensor, generators: list[torch.Generator],
                options: Options | None = None, context: Tensor | None = None) -> WindowSampler | TeacherSampler:
        """The sampler of a mode for reference latents [N, C, 1, h, w], one generator per stream; ``context``
        [N, text_len, text_dim] text embeddings or None."""
        if mode not in MODES:
            raise InputError(f"unknown mode {mode!r}; expected one of {MODES}")
        if mode == "teacher":
            if self.teacher is None:
                raise InputError("mode 'teacher' needs teacher weights (teacher.safetensors in the model folder)")
            return TeacherSampler(self.teacher, self.cfg, ref_latent, generators, text=context)
        if mode == "ar":
            return WindowSampler(self.model, self.cfg, ref_latent, generators, options, window_blocks=1,
                                 denoising_steps=(self.cfg.stream.num_train_timesteps,), context=context)
        return WindowSampler(self.model, self.cfg, ref_latent, generators, options, context=context)

    @torch.no_grad()
    def generate_batch(self, images: list, audios: list, seeds: list[int], mode: str = "avatarforcing",
                       options: Options | None = None, prompt: str | None = None, prompt_embeds=None,
                       latent_frames: int | None = None) -> list[np.ndarray]:
        """Offline generation of N videos stepped together (one DiT call per step for all of them).

        images: portraits (paths or uint8 arrays); audios: float32 16 kHz mono arrays or audio files.

        Stream i uses ``seeds[i]``'s noise exactly as ``generate`` would; audio shorter than the longest is
        padded with silence while the batch runs and its video is trimmed to its own length, so stream i
        equals ``generate(images[i], audios[i], seeds[i])`` (to float rounding) when the audios are equally
        long. For benchmarks: one batch of N short clips keeps an accelerator busy where one stream cannot.
        """
        if not (len(images) == len(audios) == len(seeds)) or not images:
            raise InputError(f"generate_batch needs as many images, audios and seeds (got {len(images)}, "
                             f"{len(audios)}, {len(seeds)}), at least one")
        B = self.cfg.stream.block_frames
        fpb = B * self.cfg.codec.temporal_stride
        framing = self.framing
        originals = [check_pcm(self.load_audio(a), f"audio {i}") for i, a in enumerate(audios)]
        totals = [framing.total(len(p)) for p in originals]  # video frames of each audio
        n_blocks = -(-(max(totals) - framing.lead) // fpb)
        if latent_frames is not None:
            if not framing.release:
                raise InputError("latent_frames fixes the release's output length: it needs stream.output: release")
            if latent_frames < 1 + B or (latent_frames - 1) % B:
                raise InputError(f"latent_frames must be 1 + a multiple of the block size {B} (e.g. {1 + 5 * B}), "
                                 f"got {latent_frames}")
            n_blocks = (latent_frames - 1) // B
            totals = [framing.lead + n_blocks * fpb] * len(totals)
        longest = max(len(p) for p in originals)
        pcms = [torch.cat([p, torch.zeros(longest - len(p))]) for p in originals]
        refs = torch.cat([self.prepare_reference(im) for im in images])
        ref_latent = self.vae.encode_image(refs)  # [N, C, 1, h, w]
        decoder = self.vae.stream_decoder()
        first = decoder.decode(ref_latent)  # latent frame 0 -> the reference reconstruction (1 frame)
        context = self.context(prompt, prompt_embeds, len(images))
        sampler = self.sampler(mode, ref_latent, [torch.Generator().manual_seed(s) for s in seeds], options, context)
        fe = self.front_end
        all_rows = None
        if fe.chunk_invariant:  # every row at once, sliced per block below
            all_rows = torch.stack([fe.features(p, 0, n_blocks * fpb) for p in pcms])  # [N, frames, D]
        elif self.clip_rows:  # the release: each file's rows once, over its video and a tail of future audio
            frames = self.cfg.codec.temporal_stride + n_blocks * fpb + self.cfg.codec.audio_clip_tail_frames
            all_rows = torch.stack([fe.clip_rows(p, frames) for p in originals])
        latents = []
        for k in range(n_blocks):
            a, b = k * fpb, (k + 1) * fpb
            rows = all_rows[:, a:b] if all_rows is not None else torch.stack([fe.features(p, a, b) for p in pcms])
            latents += self.push_block(sampler, rows)
        latents += sampler.drain()
        video = torch.cat(([first] if framing.release else []) + [decoder.decode(z) for z in latents], dim=2)
        # [N, 3, T, H, W] -> each stream's own length
        return [to_uint8(video[i].transpose(0, 1).float().cpu().numpy())[:totals[i]] for i in range(len(pcms))]


__all__ = ["Avatar", "Session", "Options", "MODES"]
