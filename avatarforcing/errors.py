"""The one exception type users see. The CLI prints it without a traceback and exits 2."""


class AvatarForcingError(Exception):
    """Bad input or an unusable file/config, with a message naming what and why."""


class ConfigError(AvatarForcingError):
    """A config field has a bad value; the message names the field."""


class InputError(AvatarForcingError):
    """An input file (audio, image, video, checkpoint) cannot be used."""


class CheckpointError(AvatarForcingError):
    """A checkpoint has missing, unexpected or mis-shaped keys."""
