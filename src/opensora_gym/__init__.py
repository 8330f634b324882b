"""opensora-gym: RL for vision-language-action policies inside the OpenSora world model.

Importing the package registers the Gymnasium ids; the environments load their models only when made.
"""

import gymnasium as gym

# The world-model envs: `gym.make_vec` builds one batched env, `gym.make` a single episode.
for _suite in ("Spatial", "Object"):
    gym.register(
        id=f"OpenSoraLibero-{_suite}-v0",
        entry_point="opensora_gym.env:OpenSoraLiberoSingleEnv",
        vector_entry_point="opensora_gym.env:OpenSoraLiberoEnv",
        kwargs={"suite": _suite.lower()},
    )
