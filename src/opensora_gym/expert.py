"""A scripted expert for LIBERO-Spatial: a waypoint controller that reads the bowl's and the plate's poses.

Every LIBERO-Spatial task is "pick up the black bowl ... and place it on the plate"; the task's BDDL file names the
bowl and the plate as its objects of interest, in that order, and the LIBERO env returns their poses with
``privileged_state=True`` (``info["object_poses"]``). The expert moves the end effector through fixed waypoints,
with the gripper pointing down as at reset (no rotation):

1. ``approach``: above the bowl, offset sideways so that the fingers close on its wall;
2. ``descend``: to the grasp point, a little above the bowl's base;
3. ``grasp``: close the gripper and hold still while it closes;
4. ``lift``: straight up to a safe height;
5. ``carry``: above the plate at that height (the same offset, so the bowl's centre lands on the plate's);
6. ``lower``: down to the release height above the plate;
7. ``release``: open the gripper and hold still while it opens;
8. ``retreat``: straight up, gripper open, and stay there (what a recording that goes on after LIBERO's success,
   ``collect --post-success-steps``, shows: the bowl resting on the plate, the hand leaving it).

Each step commands the end-effector displacement ``clip(gain * (waypoint - position), -1, 1)`` (LIBERO's controller
moves about 1.25 cm per step at full command); the first ``lift_ramp_steps`` steps of the lift rise at most at
``lift_ramp_speed``, so that a policy imitating it, which cannot tell from one frame whether the fingers have closed,
loses little by lifting too early. A phase ends when the end effector is within ``tolerance`` of its
waypoint, or after ``max_phase_steps`` steps (a bowl that blocks the fingers must not stall the episode).

Two knobs make failures on purpose, for datasets with a chosen success rate: Gaussian noise on the six arm
commands, and with ``mistake_probability`` per episode one mistake of ``mistake_kinds``: an early release while
lifting or carrying (``early_release``), a wrong place waypoint, the plate's position shifted sideways
(``wrong_place``), or a hover: the hand stops lowering at a drawn height above the release point and holds the bowl
there, never opening (``hover``; a policy that brings the bowl over the plate but not onto it fails this way), or
the same hold a few centimetres to the side, the bowl at the plate's rim (``rim``: the way the small base policy of
``experiments/libero_spatial_small`` fails task 1), all drawn from the episode's own generator.
The action before the noise is kept (``SpatialExpert.intended``): behaviour cloning learns it, while the noisy one
is executed and spreads the recorded states (DART's recipe).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from opensora_gym.spaces import ACTION_DIM

__all__ = ["MISTAKE_KINDS", "PHASES", "ScriptedSpatialExpert", "SpatialExpert", "SpatialExpertConfig", "waypoint"]

MISTAKE_KINDS = ("early_release", "wrong_place", "hover", "rim")
PHASES = ("approach", "descend", "grasp", "lift", "carry", "lower", "release", "retreat")
# Phases that end when the waypoint is reached; the others end by step count (grasp, release) or never (retreat).
_MOVING = ("approach", "descend", "lift", "carry", "lower")
# Policy gripper convention (vla_policies, spaces.controller_actions): 1 = open, 0 = close.
_OPEN, _CLOSE = 1.0, 0.0
_UP, _HORIZONTAL = np.array([0.0, 0.0, 1.0]), np.array([1.0, 1.0, 0.0])


@dataclass(frozen=True)
class SpatialExpertConfig:
    """Settings of the LIBERO-Spatial expert (lengths in metres, in the simulator's world frame).

    Attributes:
        grasp_offset: the end effector's position at the grasp relative to the bowl's base (its body position):
            4.5 cm along +y puts the fingers on the bowl's wall, 1.2 cm up just above its bottom.
        approach_height: height of the approach waypoint above the grasp point.
        lift_z: world height the bowl is lifted to and carried at (the table top is at about 0.9).
        release_height: height of the end effector above the plate's base when the gripper opens.
        gain: command per metre of error, before clipping to [-1, 1].
        tolerance: distance to a waypoint that ends a moving phase.
        grasp_steps: steps the gripper is given to close (and to open, in `release`).
        lift_ramp_steps: steps at the start of the lift whose upward command is capped (0: none).
        lift_ramp_speed: the cap of those steps, in controller units.
        max_phase_steps: steps after which a moving phase ends even if its waypoint is not reached.
        action_noise_std: standard deviation of Gaussian noise added to the six arm commands (then clipped).
        mistake_probability: probability that an episode makes one mistake, of a kind drawn uniformly from
            ``mistake_kinds``.
        mistake_kinds: the kinds of mistake, a non-empty subset of ``MISTAKE_KINDS``.
        wrong_place_distance: (min, max) sideways shift of the place waypoint of a wrong-waypoint mistake.
        hover_offset: (min, max) height of a hover mistake's hold relative to the release point (negative: below
            it, closer to the plate); also the height of a rim mistake's hold.
        rim_distance: (min, max) sideways shift of a rim mistake's hold from the release point, in a drawn
            direction.
    """

    grasp_offset: tuple[float, float, float] = (0.0, 0.045, 0.012)
    approach_height: float = 0.10
    lift_z: float = 1.15
    release_height: float = 0.10
    gain: float = 30.0
    tolerance: float = 0.01
    grasp_steps: int = 15
    lift_ramp_steps: int = 0
    lift_ramp_speed: float = 0.25
    max_phase_steps: int = 60
    action_noise_std: float = 0.0
    mistake_probability: float = 0.0
    mistake_kinds: tuple[str, ...] = ("early_release", "wrong_place")
    wrong_place_distance: tuple[float, float] = (0.12, 0.2)
    hover_offset: tuple[float, float] = (-0.06, 0.04)
    rim_distance: tuple[float, float] = (0.03, 0.07)

    def __post_init__(self) -> None:
        if len(self.grasp_offset) != 3:
            raise ValueError(f"grasp_offset must be 3 numbers (x, y, z), got {self.grasp_offset!r}")
        for name in ("approach_height", "release_height", "gain", "tolerance"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("grasp_steps", "max_phase_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if not isinstance(self.lift_ramp_steps, int) or self.lift_ramp_steps < 0:
            raise ValueError(f"lift_ramp_steps must be an int >= 0, got {self.lift_ramp_steps!r}")
        if not 0 < self.lift_ramp_speed <= 1:
            raise ValueError(f"lift_ramp_speed must lie in (0, 1], got {self.lift_ramp_speed!r}")
        if not self.action_noise_std >= 0:
            raise ValueError(f"action_noise_std must be >= 0, got {self.action_noise_std!r}")
        if not 0.0 <= self.mistake_probability <= 1.0:
            raise ValueError(f"mistake_probability must lie in [0, 1], got {self.mistake_probability!r}")
        kinds = tuple(self.mistake_kinds)
        if not kinds or len(set(kinds)) != len(kinds) or not set(kinds) <= set(MISTAKE_KINDS):
            raise ValueError(f"mistake_kinds must be distinct names from {MISTAKE_KINDS}, got {kinds!r}")
        object.__setattr__(self, "mistake_kinds", kinds)  # a list or other sequence is kept as a tuple
        for name in ("wrong_place_distance", "rim_distance"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"{name} must be (min, max) with 0 < min <= max, got {(low, high)}")
        low, high = self.hover_offset
        if not low <= high < self.approach_height:
            raise ValueError(f"hover_offset must be (min, max) with min <= max < approach_height, got {(low, high)}")


def waypoint(phase: str, bowl: np.ndarray, plate: np.ndarray, config: SpatialExpertConfig) -> tuple[np.ndarray, bool]:
    """The end-effector target of a phase and whether the gripper is open in it.

    Args:
        phase: one of ``PHASES``.
        bowl: the bowl's world position ``[3]`` (read before the grasp; afterwards the bowl moves with the hand).
        plate: the place position ``[3]`` (the plate's, or a wrong one).
        config: the expert's settings.

    Returns:
        ``(target [3] float64, gripper_open)``; for ``grasp`` and ``release`` the target is the grasp point and
        the release point, where the hand holds still; ``retreat`` is ``approach_height`` above the release point.
    """
    offset = np.asarray(config.grasp_offset, dtype=np.float64)
    grasp = np.asarray(bowl, dtype=np.float64) + offset
    place = np.asarray(plate, dtype=np.float64) + offset * _HORIZONTAL
    targets = {
        "approach": (grasp + config.approach_height * _UP, True),
        "descend": (grasp, True),
        "grasp": (grasp, False),
        "lift": (np.array([grasp[0], grasp[1], config.lift_z]), False),
        "carry": (np.array([place[0], place[1], config.lift_z]), False),
        "lower": (place + config.release_height * _UP, False),
        "release": (place + config.release_height * _UP, True),
        "retreat": (place + (config.release_height + config.approach_height) * _UP, True),
    }
    if phase not in targets:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    return targets[phase]


class SpatialExpert:
    """The expert of one episode: it keeps its phase and its random mistake.

    Args:
        config: the expert's settings.
        generator: the episode's random generator (noise and mistake).
    """

    def __init__(self, config: SpatialExpertConfig, generator: np.random.Generator) -> None:
        self.config = config
        self.generator = generator
        self.phase = "approach"
        self.phase_steps = 0
        self.bowl: np.ndarray | None = None
        self.place_shift = np.zeros(3)
        # Steps after the grasp at which an early-release mistake opens the gripper; None: no early release.
        self.release_after: int | None = None
        self.steps_since_grasp = 0
        # Height of a hover mistake's hold relative to the release point; None: the hand lowers and releases.
        self.hover: float | None = None
        self.intended = np.zeros(ACTION_DIM, dtype=np.float32)  # the last action before the noise
        if generator.random() < config.mistake_probability:
            kind = config.mistake_kinds[int(generator.random() * len(config.mistake_kinds))]
            if kind == "early_release":
                self.release_after = int(generator.integers(3, 25))
            elif kind == "hover":
                self.hover = float(generator.uniform(*config.hover_offset))
            else:  # wrong_place or rim: the place waypoint shifted sideways; a rim mistake then holds there
                angle = generator.uniform(0.0, 2.0 * math.pi)
                distance = generator.uniform(*(config.rim_distance if kind == "rim" else config.wrong_place_distance))
                self.place_shift = np.array([math.cos(angle), math.sin(angle), 0.0]) * distance
                if kind == "rim":
                    self.hover = float(generator.uniform(*config.hover_offset))

    def act(self, position: np.ndarray, bowl: np.ndarray, plate: np.ndarray) -> np.ndarray:
        """One action from the end effector's and the objects' positions.

        Args:
            position: the end effector's world position ``[3]``.
            bowl: the bowl's world position ``[3]``.
            plate: the plate's world position ``[3]``.

        Returns:
            ``[7]`` float32 action in policy units: six arm commands in [-1, 1], gripper 1 = open, 0 = close (with
            the noise; ``self.intended`` holds it without).
        """
        position = np.asarray(position, dtype=np.float64)
        if self.bowl is None or self.phase in ("approach", "descend"):
            self.bowl = np.asarray(bowl, dtype=np.float64)  # the bowl moves with the hand once grasped
        target, gripper_open = waypoint(self.phase, self.bowl, np.asarray(plate) + self.place_shift, self.config)
        if self.hover is not None and self.phase == "lower":
            target = target + self.hover * _UP
        arm = np.zeros(6)
        arm[:3] = np.clip(self.config.gain * (target - position), -1.0, 1.0)
        if self.phase == "lift" and self.phase_steps < self.config.lift_ramp_steps:
            arm[2] = min(arm[2], self.config.lift_ramp_speed)
        gripper = _OPEN if gripper_open else _CLOSE
        self.intended = np.array([*arm, gripper], dtype=np.float32)
        if self.config.action_noise_std > 0:
            arm = np.clip(arm + self.generator.normal(0.0, self.config.action_noise_std, size=6), -1.0, 1.0)
        self._advance(float(np.linalg.norm(target - position)))
        return np.array([*arm, gripper], dtype=np.float32)

    def _advance(self, distance: float) -> None:
        """Counts the step and moves to the next phase when this one is done."""
        config = self.config
        self.phase_steps += 1
        if self.phase in ("lift", "carry", "lower"):
            self.steps_since_grasp += 1
            if self.release_after is not None and self.steps_since_grasp >= self.release_after:
                self._enter("release")
                return
        if self.phase == "lower" and self.hover is not None:
            done = False  # a hover holds the bowl above the plate to the end of the episode
        elif self.phase in _MOVING:
            done = distance < config.tolerance or self.phase_steps >= config.max_phase_steps
        else:
            done = self.phase in ("grasp", "release") and self.phase_steps >= config.grasp_steps
        if done:
            self._enter(PHASES[PHASES.index(self.phase) + 1])

    def _enter(self, phase: str) -> None:
        self.phase = phase
        self.phase_steps = 0


class ScriptedSpatialExpert:
    """The expert for a LIBERO vector env: one :class:`SpatialExpert` per sub-env, one action per step.

    The env must run with ``privileged_state=True`` and ``action_chunk=1`` (the expert closes the loop every step).

    Args:
        config: the expert's settings.
        num_envs: sub-envs of the env.
    """

    action_chunk = 1

    def __init__(self, config: SpatialExpertConfig, num_envs: int) -> None:
        self.config = config
        self.experts: list[SpatialExpert | None] = [None] * num_envs
        # [N, 1, 7] policy units: the last actions before the noise (the labels behaviour cloning learns).
        self.intended_actions = np.zeros((num_envs, 1, ACTION_DIM), dtype=np.float32)

    def begin(self, index: int, seed: Any) -> None:
        """Starts the expert of sub-env ``index`` on a new episode with the generator ``default_rng(seed)``."""
        self.experts[index] = SpatialExpert(self.config, np.random.default_rng(seed))

    def act(self, observation: dict[str, Any], info: dict[str, Any]) -> np.ndarray:
        """Actions ``[N, 1, 7]`` float32 (policy units) from ``info["state"]`` and ``info["object_poses"]``."""
        if "object_poses" not in info:
            raise ValueError(
                "the scripted expert needs info['object_poses']: make the LIBERO env with privileged_state=True"
            )
        actions = np.zeros((len(self.experts), 1, ACTION_DIM), dtype=np.float32)
        for index, expert in enumerate(self.experts):
            if expert is None:
                continue
            poses = list(info["object_poses"][index].values())
            if len(poses) != 2:
                raise ValueError(
                    "the LIBERO-Spatial expert needs two objects of interest (the bowl, then the plate), got "
                    f"{list(info['object_poses'][index])}"
                )
            actions[index, 0] = expert.act(info["state"][index, :3], poses[0][:3], poses[1][:3])
            self.intended_actions[index, 0] = expert.intended
        return actions
