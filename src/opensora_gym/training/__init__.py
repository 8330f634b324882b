"""Training the parts of a world model from recorded trajectories: the VAE, the STDiT3 and the reward classifier.

The package lives in `opensora_gym` (not `trainers`, which holds the RL algorithms that use a world model) because
it produces `opensora_gym` checkpoints and depends only on `opensora_gym`'s models, data and layout.
"""
