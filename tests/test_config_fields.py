"""Every config field is read by something, or the loader refuses it: setting a field that does nothing is
impossible."""

import ast
import dataclasses
from pathlib import Path

import pytest
import yaml

from avatarforcing.config import REMOVED, CodecConfig, Config, ModelConfig, StreamConfig, TrainConfig, preset
from avatarforcing.errors import ConfigError
from avatarforcing.stream.positions import SCHEMES, clean_layout, window_layout

PACKAGE = Path(__file__).parent.parent / "avatarforcing"


def attributes_read() -> set[str]:
    """Names read as ``x.name`` anywhere in the package, except in config.py's validation (checking a value is
    not using it)."""
    names = set()
    for f in PACKAGE.rglob("*.py"):
        tree = ast.parse(f.read_text())
        skip = set()
        if f.name == "config.py":
            skip = {id(n) for fn in tree.body if isinstance(fn, ast.FunctionDef) and fn.name == "_validate"
                    for n in ast.walk(fn)}
        names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load)
                  and id(n) not in skip}
    return names


@pytest.mark.parametrize("section", [ModelConfig, CodecConfig, StreamConfig, TrainConfig, Config])
def test_every_config_field_is_read_somewhere(section):
    read = attributes_read()
    unread = [f.name for f in dataclasses.fields(section) if f.name not in read]
    assert not unread, f"{section.__name__} fields nothing reads: {unread} (delete them or use them)"


@pytest.mark.parametrize("path, value", [("stream.style_anchor", False), ("stream.rope_reindex", False),
                                         ("stream.audio_zero_pad", False), ("train.lr", 0.123),
                                         ("train.steps", 7), ("train.betas", [0.5, 0.9]), ("train.seed", True)])
def test_a_removed_field_set_to_anything_but_what_old_folders_hold_is_refused(tmp_path, path, value):
    section, name = path.split(".")
    f = tmp_path / "config.yaml"
    f.write_text(yaml.safe_dump({"preset": "mini", section: {name: value}}))
    with pytest.raises(ConfigError, match=f"{path}' was removed"):
        Config.load(f)


def test_a_model_folder_written_by_an_earlier_version_still_loads(tmp_path):
    """Its config.yaml holds every removed field at the value that version wrote: loaded, nothing changes."""
    for name in ("mini", "wan-1.3b"):
        old = preset(name).to_dict()
        old["stream"].update(style_anchor=True, rope_reindex=True, audio_zero_pad=True)
        old["train"].update({k.split(".")[1]: v[0][0 if name == "wan-1.3b" else -1] for k, v in REMOVED.items()
                             if k.startswith("train.")})
        f = tmp_path / f"{name}.yaml"
        f.write_text(yaml.safe_dump(old))
        assert Config.load(f) == preset(name)


def test_unknown_fields_are_refused_and_every_position_scheme_is_accepted(tmp_path):
    f = tmp_path / "config.yaml"
    f.write_text(yaml.safe_dump({"preset": "mini", "stream": {"style_ancor": True}}))
    with pytest.raises(ConfigError, match="unknown field 'stream.style_ancor'"):
        Config.load(f)
    for scheme in SCHEMES:  # every scheme the config accepts is laid out by positions.py
        assert preset("mini").override({"stream.positions": scheme}).stream.positions == scheme
        assert window_layout(scheme, 1, 1, 3, 1).start >= 1 and clean_layout(scheme, 1, 1, 3, 1).start >= 1
