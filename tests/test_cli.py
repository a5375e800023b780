import dataclasses

import pytest
import torch

from avatarforcing.checkpoints import load_model
from avatarforcing.cli import main
from avatarforcing.config import preset

from .test_checkpoints import peft_layout
from .test_model import tiny_model

COMMANDS = ["generate", "stream", "serve", "train", "eval", "bench", "data", "convert"]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_subcommand_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert len(capsys.readouterr().out) > 200


def test_convert_official_checkpoint(tmp_path, capsys):
    m = tiny_model()
    cfg = dataclasses.replace(preset("mini"), model=m.cfg)
    cfg.save(tmp_path / "tiny.yaml")
    torch.save({"generator": peft_layout(m.state_dict(), 4, zero_b=True)}, tmp_path / "model.pt")
    assert main(["convert", str(tmp_path / "model.pt"), "--out", str(tmp_path / "out"), "--config",
                 str(tmp_path / "tiny.yaml"), "--dtype", "fp32", "--lora-alpha", "8"]) == 0
    loaded, _ = load_model(tmp_path / "out")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in m.state_dict().items())


def test_errors_exit_2_without_traceback(tmp_path, capsys):
    assert main(["generate", "--identity", "demo", "--audio", str(tmp_path / "none.wav"),
                 "--out", str(tmp_path / "o.mp4")]) == 2
    err = capsys.readouterr().err
    assert "none.wav: audio file not found" in err and "Traceback" not in err
    assert main(["generate", "--identity", "nobody", "--audio", str(tmp_path / "none.wav"),
                 "--out", str(tmp_path / "o.mp4")]) == 2
    (tmp_path / "bad.yaml").write_text("model: {dim: -3}\n")
    assert main(["convert", str(tmp_path / "x.pt"), "--out", str(tmp_path / "o"), "--config",
                 str(tmp_path / "bad.yaml")]) == 2
    assert "model.dim" in capsys.readouterr().err
    (tmp_path / "part.json").write_text("{not json")
    assert main(["eval", "merge", "--parts", str(tmp_path / "part.json")]) == 2
    err = capsys.readouterr().err
    assert "part.json: not a readable longform JSON" in err and "Traceback" not in err


def test_generate_writes_video_matching_audio(tmp_path, capsys):
    import numpy as np
    import soundfile as sf

    from avatarforcing.data.video import read_video

    sf.write(tmp_path / "a.wav", (0.1 * np.random.default_rng(0).standard_normal(16000 * 2 + 100)), 16000)
    assert main(["generate", "--identity", "demo", "--audio", str(tmp_path / "a.wav"),
                 "--out", str(tmp_path / "o.mp4")]) == 0
    frames, fps, audio = read_video(tmp_path / "o.mp4")
    assert len(frames) == 51 and abs(len(audio) - (2 * 16000 + 100)) <= 640
    assert "51 frames" in capsys.readouterr().out
    # the generated video scored by `eval video`, with the public SyncNet's procedure on weights built here
    import json

    import torch

    from avatarforcing.eval.syncnet_v2 import SyncNetV2

    torch.manual_seed(0)
    torch.save(SyncNetV2().state_dict(), tmp_path / "syncnet_v2.model")
    assert main(["eval", "video", "--video", str(tmp_path / "o.mp4"), "--syncnet-v2",
                 str(tmp_path / "syncnet_v2.model")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["frames"] == 51 and {"sync_c", "lse_c", "lse_d", "lse_offset"} <= set(res)
