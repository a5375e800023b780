"""The published-weights path on a tiny official-format set of downloads: convert in one command, then
`generate --prompt`; the release's input handling, output length and frame 0; bad inputs get one line."""

import dataclasses
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from avatarforcing.api import Avatar
from avatarforcing.cli import main
from avatarforcing.config import ModelConfig, preset
from avatarforcing.data.video import read_video
from avatarforcing.model import AvatarDiT

from .test_checkpoints import peft_layout
from .test_codecs import _to_original, tiny_wan
from .test_text import make_tokenizer, wan_t5_state_dict

W2V_DIM = 32 * 4  # tiny wav2vec2: hidden 32, 2 layers -> last + 3 hidden states


def tiny_wan_config():
    c = preset("wan-1.3b")
    model = ModelConfig(dim=32, ffn_dim=48, num_heads=2, num_layers=2, latent_channels=4, text_dim=16, text_len=12,
                        freq_dim=16, audio_dim=W2V_DIM, audio_token_dim=8, audio_blocks=(0, 1))
    return dataclasses.replace(c, model=model, codec=dataclasses.replace(c.codec, height=32, width=32)).validate()


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    """What a user downloads, in miniature: model.pt, Wan2.1-T2V-1.3B/, wav2vec2-base-960h/, a portrait and
    44.1 kHz speech."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    d = tmp_path_factory.mktemp("downloads")
    cfg = tiny_wan_config()
    cfg.save(d / "tiny.yaml")
    torch.manual_seed(0)
    dit = AvatarDiT(cfg.model)
    torch.save({"generator": peft_layout(dit.state_dict(), 4)}, d / "model.pt")
    wan = d / "Wan2.1-T2V-1.3B"
    vocab = make_tokenizer(wan / "google" / "umt5-xxl")
    torch.save(wan_t5_state_dict(vocab, 16, 24, 4, 2), wan / "models_t5_umt5-xxl-enc-bf16.pth")
    torch.save(_to_original(tiny_wan().state_dict()), wan / "Wan2.1_VAE.pth")
    w2v = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
    Wav2Vec2Model(w2v).save_pretrained(d / "wav2vec2-base-960h")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((48, 48, 3)) * 255).astype(np.uint8)).save(d / "portrait.png")
    t = np.arange(int(44100 * 1.5)) / 44100
    sf.write(d / "speech.wav", (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))) / 2, 44100)
    return d


def convert_args(d, out, *extra):
    return ["convert", str(d / "model.pt"), "--wan", str(d / "Wan2.1-T2V-1.3B"), "--wav2vec2",
            str(d / "wav2vec2-base-960h"), "--config", str(d / "tiny.yaml"), "--out", str(out), "--dtype", "fp32",
            "--lora-alpha", "8", *extra]


@pytest.fixture(scope="module")
def converted(downloads):
    out = downloads / "af-tiny"
    assert main(convert_args(downloads, out)) == 0
    return out


def test_convert_writes_a_complete_release_folder(converted, downloads):
    import yaml

    assert {"config.yaml", "model.safetensors", "Wan2.1_VAE.pth", "components.yaml"} <= \
        {p.name for p in converted.iterdir()}
    parts = yaml.safe_load((converted / "components.yaml").read_text())
    assert parts["text_encoder"].endswith("models_t5_umt5-xxl-enc-bf16.pth")
    assert parts["tokenizer"].endswith("umt5-xxl") and parts["wav2vec2"].endswith("wav2vec2-base-960h")
    av = Avatar.load(converted)
    c = av.cfg
    assert (c.stream.positions, c.stream.output, c.codec.image_filter, c.codec.resampler, c.codec.audio_rows) == \
        ("release", "release", "bilinear", "sinc_hann", "clip")  # an official checkpoint gets the release's engine


def test_generate_with_prompt_end_to_end(converted, downloads, capsys):
    out = downloads / "out.mp4"
    assert main(["generate", "--model", str(converted), "--image", str(downloads / "portrait.png"), "--audio",
                 str(downloads / "speech.wav"), "--prompt", "a person speaks to the camera", "--out", str(out)]) == 0
    frames, fps, audio = read_video(out)
    assert fps == 25 and frames.shape == (1 + 38, 32, 32, 3)  # frame 0 + the 1.5 s of audio (38 frames)
    assert audio is not None and abs(len(audio) / 16000 - 39 / 25) < 0.05  # the writer pads audio to the video
    assert len(list((converted / "prompts").glob("*.safetensors"))) == 1  # the prompt was encoded once, cached
    assert main(["generate", "--model", str(converted), "--image", str(downloads / "portrait.png"), "--audio",
                 str(downloads / "speech.wav"), "--prompt", "a person speaks to the camera", "--out", str(out),
                 "--latent-frames", "9"]) == 0
    assert read_video(out)[0].shape[0] == 1 + 4 * 8  # the release's 1 + 4 (N - 1) frames


def test_release_output_frame_0_is_the_reference_and_prompts_change_the_video(converted, downloads):
    av = Avatar.load(converted)
    img, wav = str(downloads / "portrait.png"), str(downloads / "speech.wav")
    a = av.generate(img, wav, prompt="a person speaks to the camera")
    b = av.generate(img, wav, prompt="a woman smiles")
    ref = av.vae.stream_decoder().decode(av.vae.encode_image(av.prepare_reference(img)))
    from avatarforcing.data.image import to_uint8

    assert np.array_equal(a[0], to_uint8(ref[0, :, 0].numpy()))
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[1:], b[1:])
    # a session (bounded audio windows) also starts with the reference frame and has the same length
    s = av.session(img, prompt="a person speaks to the camera")
    pcm = av.load_audio(wav)
    frames = np.concatenate(s.push(pcm) + s.close())
    assert frames.shape == a.shape and np.array_equal(frames[0], a[0])


def test_clip_rows_are_computed_once_over_the_whole_file(converted, downloads):
    """The release normalises the whole file, then encodes 4N + 80 frames at once: rows of a block depend on
    audio after it (unlike the bounded streaming rows)."""
    av = Avatar.load(converted)
    fe = av.front_end
    pcm = torch.from_numpy(av.load_audio(str(downloads / "speech.wav")))
    rows = fe.clip_rows(pcm, 120)
    assert rows.shape == (120, W2V_DIM)
    late = pcm.clone()
    late[16000:] *= -3.0  # change only audio after 1 s
    assert not torch.allclose(fe.clip_rows(late, 120)[:10], rows[:10])  # early rows see it (normalisation, context)
    x = (pcm - pcm.mean()) / torch.sqrt(pcm.var(correction=0) + 1e-7)
    want = fe._encode(torch.cat([x, torch.zeros(120 * 640 - len(x))]), 120, normalise=False)
    assert torch.equal(rows, want)


def test_bad_published_inputs_one_line(downloads, tmp_path, capsys):
    def run(args, expect):
        assert main(args) == 2
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert expect in lines[-1] and "Traceback" not in err and sum("error:" in x for x in lines) == 1, err

    broken = tmp_path / "Wan-no-t5"
    shutil.copytree(downloads / "Wan2.1-T2V-1.3B", broken)
    (broken / "models_t5_umt5-xxl-enc-bf16.pth").unlink()
    args = convert_args(downloads, tmp_path / "o1")
    args[args.index("--wan") + 1] = str(broken)
    run(args, "no umT5 text encoder")
    bad_tok = tmp_path / "Wan-bad-tokenizer"
    shutil.copytree(downloads / "Wan2.1-T2V-1.3B", bad_tok)
    shutil.rmtree(bad_tok / "google" / "umt5-xxl")
    (bad_tok / "google" / "umt5-xxl").mkdir()
    (bad_tok / "google" / "umt5-xxl" / "tokenizer_config.json").write_text("{}")
    args[args.index("--wan") + 1] = str(bad_tok)
    run(args, "not a umT5 tokenizer folder")
    run(convert_args(downloads, tmp_path / "o2", "--lora-rank", "16"), "LoRA rank mismatch")
    no_alpha = convert_args(downloads, tmp_path / "o3")
    del no_alpha[-2:]
    run(no_alpha, "--lora-alpha")
    out = tmp_path / "ok"
    assert main(convert_args(downloads, out)) == 0
    capsys.readouterr()
    gen = ["generate", "--model", str(out), "--image", str(downloads / "portrait.png"), "--audio",
           str(downloads / "speech.wav"), "--out", str(tmp_path / "x.mp4")]
    run(gen + ["--prompt", "hello world " * 20], "the model takes at most 12")
    run(gen + ["--prompt-embeds", str(tmp_path / "none.safetensors")], "prompt embeddings file not found")
    run(gen + ["--latent-frames", "6"], "latent_frames must be 1 + a multiple")


def test_encode_prompt_cli_and_embeds(converted, downloads, tmp_path):
    emb = tmp_path / "p.safetensors"
    assert main(["encode-prompt", "a person speaks", "--model", str(converted), "--out", str(emb),
                 "--device", "cpu"]) == 0
    av = Avatar.load(converted)
    from_file = av.context(prompt_embeds=str(emb))
    assert from_file.shape == (1, 12, 16)
    assert torch.equal(from_file, av.context(prompt="a person speaks"))


def test_bench_audio_rows_reports_every_setting(downloads, tmp_path):
    from avatarforcing.eval.bench import audio_rows_main

    res = audio_rows_main(str(downloads / "wav2vec2-base-960h"), str(downloads / "speech.wav"), [8, 25], [0, 2],
                          json_path=str(tmp_path / "rows.json"))
    assert [(r["left_context_frames"], r["lookahead_frames"]) for r in res] == [(8, 0), (8, 2), (25, 0), (25, 2)]
    assert all(r["lookahead_ms"] == 40 * r["lookahead_frames"] and 0 < r["rel_l2"] for r in res)
    assert (tmp_path / "rows.json").is_file()
