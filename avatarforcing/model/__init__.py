from .dit import AvatarDiT, count_parameters, pack_audio_rows, velocity_to_x0, x0_to_velocity
from .layers import KVPrefix

__all__ = ["AvatarDiT", "KVPrefix", "count_parameters", "pack_audio_rows", "velocity_to_x0", "x0_to_velocity"]
