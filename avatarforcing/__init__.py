"""avatarforcing: one-step streaming diffusion for real-time talking avatars."""

from .errors import AvatarForcingError, CheckpointError, ConfigError, InputError

__version__ = "0.1.0"


def __getattr__(name):  # keep `import avatarforcing` light; torch loads on first use of the API
    if name in ("Avatar", "Session", "Options"):
        from . import api

        return getattr(api, name)
    raise AttributeError(name)


__all__ = ["Avatar", "Session", "Options", "AvatarForcingError", "CheckpointError", "ConfigError", "InputError"]
