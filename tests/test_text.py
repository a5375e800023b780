"""Text conditioning: Wan's umT5 layout converted to transformers, the release's cleaning and padding."""

import math

import pytest
import torch

from avatarforcing.codecs.text import (
    Prompts,
    TextEncoder,
    clean_prompt,
    load_umt5,
    pad_context,
    umt5_config,
    umt5_from_state_dict,
    wan_t5_to_transformers,
)
from avatarforcing.errors import InputError

WORDS = "a person speaks to the camera calmly hello world woman man smiles".split()


def wan_t5_state_dict(vocab, dim, ffn, heads, layers, buckets=32, device=None, seed=0):
    """A state dict with the key names and shapes of Wan's ``models_t5_umt5-xxl-enc-bf16.pth``."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape, scale=1.0):
        if device == "meta":
            return torch.empty(shape, device="meta")
        return torch.randn(shape, generator=g) * scale

    sd = {"token_embedding.weight": t(vocab, dim), "norm.weight": 1 + 0.1 * t(dim)}
    for i in range(layers):
        sd |= {f"blocks.{i}.norm1.weight": 1 + 0.1 * t(dim), f"blocks.{i}.norm2.weight": 1 + 0.1 * t(dim),
               f"blocks.{i}.pos_embedding.embedding.weight": t(buckets, heads)}
        for n in "qkvo":
            sd[f"blocks.{i}.attn.{n}.weight"] = t(dim, dim, scale=dim ** -0.5)
        sd[f"blocks.{i}.ffn.gate.0.weight"] = t(ffn, dim, scale=dim ** -0.5)
        sd[f"blocks.{i}.ffn.fc1.weight"] = t(ffn, dim, scale=dim ** -0.5)
        sd[f"blocks.{i}.ffn.fc2.weight"] = t(dim, ffn, scale=ffn ** -0.5)
    return sd


def reference_t5(sd, ids, mask, heads, eps=1e-6, max_dist=128):
    """umT5's encoder written from its definition, on the Wan-layout weights: RMS norms, attention without
    1/sqrt(d) scaling plus a per-layer bidirectional relative-position bias, gated GELU(tanh) feed-forward."""
    def rms(x, w):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    def bucket(rel, buckets):
        half = buckets // 2
        out = (rel > 0).long() * half
        rel = rel.abs()
        exact = half // 2
        large = exact + (torch.log(rel.float().clamp(min=1) / exact) / math.log(max_dist / exact)
                         * (half - exact)).long()
        return out + torch.where(rel < exact, rel, large.clamp(max=half - 1))

    x = sd["token_embedding.weight"][ids]  # [1, n, dim]
    n = ids.shape[1]
    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]  # key - query
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(layers):
        w = {k[len(f"blocks.{i}."):]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
        table = w["pos_embedding.embedding.weight"]
        bias = table[bucket(rel, table.shape[0])].permute(2, 0, 1)[None]  # [1, heads, n, n]
        h = rms(x, w["norm1.weight"])
        q, k, v = (torch.nn.functional.linear(h, w[f"attn.{c}.weight"]).unflatten(-1, (heads, -1)) for c in "qkv")
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) + bias
        scores = scores.masked_fill(mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
        att = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).flatten(2)
        x = x + torch.nn.functional.linear(att, w["attn.o.weight"])
        h = rms(x, w["norm2.weight"])
        gate = torch.nn.functional.gelu(torch.nn.functional.linear(h, w["ffn.gate.0.weight"]), approximate="tanh")
        x = x + torch.nn.functional.linear(gate * torch.nn.functional.linear(h, w["ffn.fc1.weight"]),
                                           w["ffn.fc2.weight"])
    return rms(x, sd["norm.weight"])


def make_tokenizer(folder):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"▁{w}", -1.0) for w in WORDS]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz.,▁"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                    extra_ids=0).save_pretrained(folder)
    return len(vocab)


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    """A tiny Wan-style folder: the umT5 .pth in Wan's layout and a google/umt5-xxl/ tokenizer folder."""
    d = tmp_path_factory.mktemp("wan_t5")
    vocab = make_tokenizer(d / "google" / "umt5-xxl")
    torch.save(wan_t5_state_dict(vocab, 16, 24, 4, 2), d / "models_t5_umt5-xxl-enc-bf16.pth")
    return d


def test_xxl_layout_on_meta_converts_and_loads():
    sd = wan_t5_to_transformers(wan_t5_state_dict(256384, 4096, 10240, 64, 24, device="meta"))
    cfg = umt5_config(sd)
    assert (cfg.vocab_size, cfg.d_model, cfg.d_ff, cfg.num_layers, cfg.num_heads, cfg.d_kv) == \
        (256384, 4096, 10240, 24, 64, 64)
    model = umt5_from_state_dict(sd, "models_t5_umt5-xxl-enc-bf16.pth")
    assert model.encoder.embed_tokens.weight is model.shared.weight
    n = sum(p.numel() for p in model.parameters())
    assert 5.6e9 < n < 5.8e9  # umT5-XXL's encoder: 5.7B parameters


def test_converted_encoder_equals_the_definition(tiny_t5):
    sd = torch.load(tiny_t5 / "models_t5_umt5-xxl-enc-bf16.pth")
    model = load_umt5(tiny_t5 / "models_t5_umt5-xxl-enc-bf16.pth", dtype=torch.float32)
    ids = torch.tensor([[3, 7, 9, 4, 1, 0, 0]])
    mask = (torch.arange(7) < 5).long()[None]
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    want = reference_t5(sd, ids, mask, heads=4)
    assert torch.allclose(got[:, :5], want[:, :5], atol=1e-5)
    swapped = dict(sd)  # the GELU branch and the linear branch are not interchangeable
    swapped["blocks.0.ffn.gate.0.weight"], swapped["blocks.0.ffn.fc1.weight"] = sd["blocks.0.ffn.fc1.weight"], \
        sd["blocks.0.ffn.gate.0.weight"]
    assert not torch.allclose(reference_t5(swapped, ids, mask, 4)[:, :5], want[:, :5], atol=1e-3)


def test_encode_pads_with_zero_rows_and_ignores_padding(tiny_t5):
    enc = TextEncoder(tiny_t5 / "models_t5_umt5-xxl-enc-bf16.pth", tiny_t5 / "google" / "umt5-xxl", text_len=12,
                      dtype=torch.float32)
    ids, mask = enc.tokenize("  a person\n speaks  ")
    n = int(mask.sum())
    assert ids[0, n - 1] == enc.tokenizer.eos_token_id and n < 12
    ctx = enc.encode("  a person\n speaks  ")
    assert ctx.shape == (1, 12, 16) and torch.all(ctx[:, n:] == 0) and torch.all(ctx[:, :n].abs().sum(-1) > 0)
    with torch.no_grad():  # rows of the prompt do not depend on how far it is padded
        alone = enc.model(input_ids=ids[:, :n]).last_hidden_state
    assert torch.allclose(ctx[:, :n], alone, atol=1e-5)
    with pytest.raises(InputError, match="prompt is .* tokens; the model takes at most 12"):
        enc.encode("hello world " * 10)


def test_clean_prompt_is_the_release_cleaning():
    assert clean_prompt("  \u201cHello\u201d  &amp;amp; \n\t world ") == '"Hello" & world'
    assert clean_prompt("caf\u00c3\u00a9") == "caf\u00e9"  # ftfy repairs mojibake


def test_bad_text_inputs(tiny_t5, tmp_path):
    with pytest.raises(InputError, match="umT5 text encoder not found"):
        load_umt5(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(InputError, match="not a umT5 tokenizer folder"):
        TextEncoder(tiny_t5 / "models_t5_umt5-xxl-enc-bf16.pth", tmp_path / "tok")
    with pytest.raises(InputError, match="tokenizer folder not found"):
        TextEncoder(tiny_t5 / "models_t5_umt5-xxl-enc-bf16.pth", tmp_path / "nowhere")
    with pytest.raises(InputError, match="expected \\[n, 16\\]"):
        pad_context(torch.zeros(3, 8), 12, 16)
    with pytest.raises(InputError, match="more than the model's text length"):
        pad_context(torch.zeros(13, 16), 12, 16)
    with pytest.raises(InputError, match="no text conditioning"):
        Prompts(0, 0).context("hello")
    with pytest.raises(InputError, match="references no umT5 encoder"):
        Prompts(12, 16).context("hello")


def test_short_context_is_zero_padded_and_padding_changes_the_dit():
    """The release pads the context to text_len with zero rows; the text embedding of a zero row is not zero,
    so 3 rows and the same 3 rows padded to 5 condition the DiT differently. Prompts always pads."""
    from .conftest import tiny_model

    m = tiny_model()  # text_dim 16, text_len 5
    rows = torch.randn(1, 3, 16)
    padded = Prompts(5, 16).context(embeds=rows)
    assert padded.shape == (1, 5, 16) and torch.equal(padded[:, :3], rows) and torch.all(padded[:, 3:] == 0)
    x = torch.randn(1, m.cfg.in_channels, 2, 4, 4)
    t = torch.full((1, 2), 500.0)
    pos = torch.arange(2)
    with torch.no_grad():
        a, b = m(x, t, pos, context=rows), m(x, t, pos, context=padded)
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("scheme", ["always", "first", "never"])
def test_the_tokenizer_reads_its_files_pre_tokenizer(tmp_path, scheme):
    """transformers 5.x rebuilds a T5 tokenizer's pre-tokenizer (prepend "always"); the release's 4.49 reads
    ``tokenizer.json``. With a file that prepends otherwise, ``load_tokenizer`` must tokenise as the file says."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    from avatarforcing.codecs.text import load_tokenizer

    words = ["hello", "world", "calm"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"▁{w}", -1.0) for w in words]
    vocab += [(w, -1.5) for w in words] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz.,▁"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=scheme)
    tok.decoder = decoders.Metaspace(prepend_scheme=scheme)
    T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                    extra_ids=0).save_pretrained(tmp_path)
    by_file = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path)
    for text in ("hello world", "calm hello", "world"):
        assert loaded(text, add_special_tokens=False).input_ids == by_file.encode(text, add_special_tokens=False).ids
    first = loaded("hello world", add_special_tokens=False).input_ids[0]
    assert first == (vocab.index(("hello", -1.5)) if scheme == "never" else vocab.index(("▁hello", -1.0)))
