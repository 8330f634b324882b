"""opensora-gym: RL for vision-language-action policies inside the OpenSora world model.

Importing the package registers the Gymnasium ids; the environments load their models only when made.
"""

import gymnasium as gym

__version__ = "0.2.0"

# The world-model envs: `gym.make_vec` builds one batched env, `gym.make` a single episode. In both,
# `max_episode_steps=N` is the env's own limit in actions: `make_vec` passes it to the vector entry point, and the
# single env reads it from `gym.make`, which keeps it for a TimeLimit (`opensora_gym.single.make_time_limit`).
# The `-Image-v0` ids observe the image alone (the task text in `info["task"]`), what Stable-Baselines3 can batch;
# they have no vector entry point, so `gym.make_vec` steps one single env per sub-env.
WORLD_MODEL_ENV_IDS = {"spatial": "OpenSoraLibero-Spatial-v0", "object": "OpenSoraLibero-Object-v0"}
for _suite, _id in WORLD_MODEL_ENV_IDS.items():
    gym.register(
        id=_id,
        entry_point="opensora_gym.env:OpenSoraLiberoSingleEnv",
        vector_entry_point="opensora_gym.env:OpenSoraLiberoEnv",
        kwargs={"suite": _suite},
    )
    gym.register(
        id=_id.replace("-v0", "-Image-v0"),
        entry_point="opensora_gym.env:OpenSoraLiberoSingleEnv",
        kwargs={"suite": _suite, "image_only": True},
    )

# The real LIBERO simulator (extra `opensora-gym[libero]`): string entry points, so LIBERO, robosuite and MuJoCo
# are imported only when such an env is made.
for _id, _suite in (
    ("Spatial", "libero_spatial"),
    ("Object", "libero_object"),
    ("Goal", "libero_goal"),
    ("10", "libero_10"),
    ("90", "libero_90"),
):
    gym.register(
        id=f"Libero-{_id}-v0",
        entry_point="opensora_gym.libero:LiberoSingleEnv",
        vector_entry_point="opensora_gym.libero:make_libero_vector_env",
        kwargs={"suite": _suite},
    )
    gym.register(
        id=f"Libero-{_id}-Image-v0",
        entry_point="opensora_gym.libero:LiberoSingleEnv",
        kwargs={"suite": _suite, "image_only": True},
    )
