"""Text conditioning: umT5-XXL (Wan2.1's text encoder) -> the context rows of cross-attention.

    prompt --clean (ftfy, HTML entities, whitespace: as the release)--> "..."
           --tokenizer (google/umt5-xxl, </s> appended, <= text_len tokens)--> ids [1, n]
           --UMT5EncoderModel (transformers)--> [1, n, 4096]
           --zero rows up to text_len--> context [1, text_len, 4096]

The release runs the encoder over all ``text_len`` (512) positions with an attention mask and then zeroes
the rows past the prompt; the DiT's text embedding is applied to the zero rows too, so the padding is part
of the conditioning (a 4-token context is not the same as the same 4 rows padded to 512).

Weights: the Wan folder's original ``models_t5_umt5-xxl-enc-bf16.pth`` (Wan's own T5 layout, renamed to
transformers' names by the table below) or a diffusers-layout ``text_encoder/`` folder (transformers' layout
already). Cached embeddings are safetensors files with one ``context`` tensor [1, text_len, dim].
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import torch
from torch import Tensor

from ..checkpoints import StateDict, atomic_write, read_state_dict
from ..errors import CheckpointError, InputError

# A prompt for talking-head models when the user gives none (wan models are trained with captions like it).
DEFAULT_PROMPT = (
    "A person faces the camera and speaks naturally in a calm, even rhythm; lip shapes are clearly "
    "articulated, with natural blinks and small head movements. The camera is steady on a mid-close shot; "
    "the lighting is soft and balanced, with consistent skin tone and stable colour throughout."
)

# Wan's T5 encoder (wan/modules/t5.py) -> transformers' UMT5EncoderModel, per block {i}.
_WAN_T5_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",  # per layer (umT5)
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # the GELU branch
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",  # the linear branch
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_WAN_T5_TOP = {"token_embedding.weight": "shared.weight", "norm.weight": "encoder.final_layer_norm.weight"}


def wan_t5_to_transformers(sd: StateDict, source: str = "umT5") -> StateDict:
    """Rename a ``models_t5_umt5-xxl-enc-bf16.pth`` state dict to ``UMT5EncoderModel`` names."""
    out: StateDict = {}
    for k, v in sd.items():
        m = re.match(r"blocks\.(\d+)\.(.+)$", k)
        if m and m.group(2) in _WAN_T5_BLOCK:
            out[f"encoder.block.{m.group(1)}.{_WAN_T5_BLOCK[m.group(2)]}"] = v
        elif k in _WAN_T5_TOP:
            out[_WAN_T5_TOP[k]] = v
        else:
            raise CheckpointError(f"{source}: unexpected key {k!r} for Wan's umT5 encoder layout "
                                  f"(expected token_embedding, blocks.N.{{norm1,attn,pos_embedding,norm2,ffn}}, norm)")
    if "shared.weight" not in out:
        raise CheckpointError(f"{source}: no token_embedding.weight: not Wan's umT5 encoder")
    out["encoder.embed_tokens.weight"] = out["shared.weight"]  # tied in transformers
    return out


def umt5_config(sd: StateDict):
    """The encoder's shape, read from a transformers-layout state dict (umT5-XXL: 24 x 4096, 64 heads)."""
    from transformers import UMT5Config

    vocab, dim = sd["shared.weight"].shape
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.block."))
    buckets, heads = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
    ffn = sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0]
    attn = sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
    return UMT5Config(vocab_size=vocab, d_model=dim, d_kv=attn // heads, d_ff=ffn, num_layers=layers,
                      num_heads=heads, relative_attention_num_buckets=buckets, relative_attention_max_distance=128,
                      feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, is_encoder_decoder=False,
                      use_cache=False, tie_word_embeddings=True)


def load_umt5(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16):
    """``UMT5EncoderModel`` from the original ``.pth`` (Wan layout) or a diffusers ``text_encoder/`` folder."""

    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: umT5 text encoder not found (expected models_t5_umt5-xxl-enc-bf16.pth from the "
                         f"Wan2.1 folder, or a diffusers text_encoder/ folder)")
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise InputError(f"{p}: not a text_encoder folder (no config.json)")
        from transformers import UMT5EncoderModel

        try:
            return UMT5EncoderModel.from_pretrained(str(p), torch_dtype=dtype).to(device).eval()
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds
            raise CheckpointError(f"{p}: cannot load as a umT5 encoder ({type(e).__name__}: {_one_line(e)})") from None
    return umt5_from_state_dict(wan_t5_to_transformers(read_state_dict(p), str(p)), str(p), dtype).to(device)


def umt5_from_state_dict(sd: StateDict, source: str, dtype: torch.dtype = torch.bfloat16):
    """A transformers-layout state dict -> ``UMT5EncoderModel`` holding those tensors (no copy at init)."""
    from transformers import UMT5EncoderModel

    from ..checkpoints import load_into

    with torch.device("meta"):
        model = UMT5EncoderModel(umt5_config(sd))
    load_into(model, {k: v.to(dtype) for k, v in sd.items()}, source, assign=True)
    model.encoder.embed_tokens = model.shared  # the tie, broken by assigning tensors
    return model.eval()


def _one_line(e: Exception, limit: int = 200) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + "..."


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise InputError(f"{p}: tokenizer folder not found (expected the Wan folder's google/umt5-xxl/)")
    try:
        tok = AutoTokenizer.from_pretrained(str(p))
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{p}: not a umT5 tokenizer folder (expected google/umt5-xxl/ with tokenizer.json or "
                         f"spiece.model): {type(e).__name__}: {_one_line(e)}") from None
    if tok.pad_token_id is None or tok.eos_token_id is None:
        raise InputError(f"{p}: the tokenizer has no pad or </s> token; expected the umT5 tokenizer")
    return _with_files_pre_tokenizer(tok, p / "tokenizer.json")


def _with_files_pre_tokenizer(tok, file: Path):
    """transformers 5.x's T5 tokenizer rebuilds its pre-tokenizer (whitespace split + Metaspace, prepend
    "always") instead of reading ``tokenizer.json``, as 4.49 (the release's pin) does. For a file whose
    Metaspace prepends otherwise ("first", "never") the first word would tokenise differently: take the
    file's pre-tokenizer and decoder back."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None or not file.is_file():
        return tok
    try:
        spec = json.loads(file.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    except (OSError, ValueError):
        return tok
    parts = spec.get("pretokenizers", [spec]) if spec.get("type") == "Sequence" else [spec]
    if any(t.get("type") == "Metaspace" and t.get("prepend_scheme", "always") != "always" for t in parts):
        from tokenizers import Tokenizer

        own = Tokenizer.from_file(str(file))
        backend.pre_tokenizer, backend.decoder = own.pre_tokenizer, own.decoder
    return tok


def clean_prompt(text: str) -> str:
    """The release's 'whitespace' cleaning: ftfy, HTML entities unescaped twice, whitespace collapsed."""
    try:
        import ftfy
    except ImportError:
        raise InputError("prompts need the wan extra: pip install -e '.[wan]' (ftfy, transformers)") from None

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


def pad_context(context: Tensor, text_len: int, text_dim: int, source: str = "prompt embeddings") -> Tensor:
    """[n, dim] or [1, n, dim] -> [1, text_len, dim] float32, zero rows after the n given (as the release)."""
    c = context.float()
    if c.ndim == 2:
        c = c[None]
    if c.ndim != 3 or c.shape[0] != 1 or c.shape[2] != text_dim:
        raise InputError(f"{source}: expected [n, {text_dim}] or [1, n, {text_dim}] text embeddings, "
                         f"got {tuple(context.shape)}")
    if c.shape[1] > text_len:
        raise InputError(f"{source}: {c.shape[1]} rows, more than the model's text length {text_len}")
    return torch.cat([c, c.new_zeros(1, text_len - c.shape[1], text_dim)], dim=1)


class TextEncoder:
    """Tokenizer + umT5 encoder: ``encode(prompt)`` -> [1, text_len, dim] context (float32, on the CPU)."""

    def __init__(self, encoder: str | Path, tokenizer: str | Path, text_len: int = 512,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16):
        self.tokenizer = load_tokenizer(tokenizer)
        self.model = load_umt5(encoder, device, dtype)
        self.text_len, self.device = text_len, torch.device(device)
        vocab = self.model.config.vocab_size
        if len(self.tokenizer) > vocab:
            raise InputError(f"{tokenizer}: tokenizer has {len(self.tokenizer)} tokens but the encoder's vocabulary "
                             f"is {vocab}: tokenizer and encoder do not belong together")

    def tokenize(self, prompt: str) -> tuple[Tensor, Tensor]:
        """ids, mask [1, text_len]; a prompt longer than text_len tokens is an error (never cut silently)."""
        text = clean_prompt(prompt)
        n = len(self.tokenizer(text, add_special_tokens=True).input_ids)
        if n > self.text_len:
            raise InputError(f"prompt is {n} tokens; the model takes at most {self.text_len}: shorten it")
        t = self.tokenizer([text], padding="max_length", max_length=self.text_len, truncation=True,
                           add_special_tokens=True, return_tensors="pt")
        return t.input_ids, t.attention_mask

    @torch.no_grad()
    def encode(self, prompt: str) -> Tensor:
        ids, mask = self.tokenize(prompt)
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
        out = out.float().cpu() * mask[..., None]  # rows past the prompt are zero, as the release sets them
        return out

    def close(self) -> None:
        """Free the encoder (5.7B parameters for umT5-XXL)."""
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def save_prompt_embeds(path: str | Path, context: Tensor, prompt: str) -> Path:
    from safetensors.torch import save_file

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(p, lambda tmp: save_file({"context": context.float().contiguous()}, str(tmp),
                                          metadata={"format": "avatarforcing-prompt", "prompt": prompt}))
    return p


def load_prompt_embeds(path: str | Path, text_len: int, text_dim: int) -> Tensor:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: prompt embeddings file not found (write one with `avatarforcing encode-prompt`)")
    sd = read_state_dict(p)
    if "context" not in sd:
        raise InputError(f"{p}: expected a 'context' tensor (from `avatarforcing encode-prompt`), found {sorted(sd)}")
    return pad_context(sd["context"], text_len, text_dim, str(p))


class Prompts:
    """Where a model's text context comes from: embeddings given or cached, or the umT5 encoder it references.

    ``context(prompt, embeds)`` -> [1, text_len, text_dim] or None for models without text conditioning.
    Precedence: ``embeds`` (a tensor or a file from ``encode-prompt``), then ``prompt`` (encoded once and cached
    in memory and, when the model folder is writable, in ``<model>/prompts/``), then the default: the
    folder's ``prompt.safetensors`` or ``DEFAULT_PROMPT``. The encoder is loaded for an encode and freed.
    """

    def __init__(self, text_len: int, text_dim: int, encoder: str | Path | None = None,
                 tokenizer: str | Path | None = None, folder: Path | None = None, required: bool = True):
        self.text_len, self.text_dim = text_len, text_dim
        self.encoder, self.tokenizer, self.folder = encoder, tokenizer, folder
        self.required = required  # False for random-weight models: no prompt means no cross-attention
        self.default_embeds = folder / "prompt.safetensors" if folder is not None else None
        self.server_default: Tensor | None = None  # set by ``set_default``
        self._memory: dict[str, Tensor] = {}

    def set_default(self, prompt: str | None = None, embeds: str | Path | Tensor | None = None) -> None:
        """Make this prompt (or these embeddings) what ``context()`` returns when a call names none."""
        if prompt is not None or embeds is not None:
            self.server_default = self.context(prompt, embeds)

    def context(self, prompt: str | None = None, embeds: str | Path | Tensor | None = None) -> Tensor | None:
        if not self.text_dim:
            if prompt is not None or embeds is not None:
                raise InputError("this model has no text conditioning (text_dim 0): drop the prompt")
            return None
        if embeds is not None:
            if isinstance(embeds, Tensor):
                return pad_context(embeds, self.text_len, self.text_dim)
            return load_prompt_embeds(embeds, self.text_len, self.text_dim)
        if prompt is None:
            if self.server_default is not None:
                return self.server_default
            if self.default_embeds is not None and self.default_embeds.is_file():
                return load_prompt_embeds(self.default_embeds, self.text_len, self.text_dim)
            if not self.required:
                return None
            prompt = DEFAULT_PROMPT
        if not isinstance(prompt, str):
            raise InputError(f"the prompt must be a string, got {type(prompt).__name__}")
        return self._encode(prompt)

    def _cache_file(self, prompt: str) -> Path | None:
        if self.folder is None:
            return None
        import hashlib

        key = hashlib.sha256(f"{self.text_len}\n{clean_prompt(prompt)}".encode()).hexdigest()[:24]
        return self.folder / "prompts" / f"{key}.safetensors"

    def _encode(self, prompt: str) -> Tensor:
        if prompt in self._memory:
            return self._memory[prompt]
        cached = self._cache_file(prompt)
        if cached is not None and cached.is_file():
            ctx = load_prompt_embeds(cached, self.text_len, self.text_dim)
        else:
            if self.encoder is None or self.tokenizer is None:
                raise InputError("this model needs text embeddings and references no umT5 encoder: pass "
                                 "--prompt-embeds FILE (from `avatarforcing encode-prompt`), or convert the model "
                                 "with --wan WAN_FOLDER so its text encoder is known")
            ctx = encode_prompt(prompt, self.encoder, self.tokenizer, self.text_len)
            if cached is not None:
                try:
                    save_prompt_embeds(cached, ctx, prompt)
                except OSError:
                    pass  # a read-only model folder: keep the result in memory only
        if ctx.shape[2] != self.text_dim:
            raise InputError(f"the text encoder gives {ctx.shape[2]}-dim rows; this model takes {self.text_dim}")
        self._memory[prompt] = ctx
        return ctx


def encode_prompt(prompt: str, encoder: str | Path, tokenizer: str | Path, text_len: int = 512,
                  device: str | None = None) -> Tensor:
    """Load umT5 (GPU bf16 if there is one, else CPU bf16), encode one prompt, free it: [1, text_len, dim]."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    enc = TextEncoder(encoder, tokenizer, text_len, device, torch.bfloat16)
    try:
        return enc.encode(prompt)
    finally:
        enc.close()
