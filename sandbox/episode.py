"""One agent episode: a policy emits tool calls, a sandbox session runs them, the task's check scores it.

A task is a YAML file (the `Task` model below is its schema). `Episode` is the one episode loop's
stepper (open a session and set the task up, `step` on each assistant turn, `finish` with the
check); `run_episode` drives one with a policy, anything with `policy(messages) -> str`: the
scripted policy replays the task's `scripted_turns`, `HFPolicy` generates with a local Hugging
Face checkpoint. GRPO rollouts, eval and OPD drive many at once, a batched generate call per turn
(`rollout.episodes`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from sandbox import toolcall
from sandbox.container import MAX_TIMEOUT_S, Result, SandboxError
from sandbox.pool import SandboxPool, Session

log = logging.getLogger(__name__)

Policy = Callable[[list[dict]], str]


class TaskError(ValueError):
    """A task file that cannot be used; the message names the file and the field."""


class Setup(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    files: dict[str, str] = Field(default_factory=dict, description="Files written into /work before the first turn.")
    commands: list[str] = Field(default_factory=list, description="bash commands run (in order) after the files are written.")


class Task(BaseModel):
    """An agent task: what the model is asked, how the sandbox starts, and how success is checked."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Short identifier, used in logs and transcripts.")
    prompt: str = Field(description="The user message that states the task.")
    setup: Setup = Field(default_factory=Setup, description="Sandbox state before the first turn.")
    check: str = Field(description=(
        "bash command run in the episode's session after the last turn, once every process of the episode is "
        "killed and `check_files` are rewritten; exit 0 means solved (reward 1.0). It runs with a fixed PATH and "
        "environment: no HOME, no user site-packages, and Python does not put the script's directory on "
        "sys.path (PYTHONSAFEPATH), so a Python check appends /work itself to import the agent's solution."))
    check_files: list[str] = Field(default_factory=list, description=(
        "Paths from setup.files that the check depends on; each is written fresh from setup.files just before "
        "the check, over whatever the agent left there (a symlink is replaced, not followed)."))
    max_turns: int = Field(8, ge=1, description="Assistant turns before the episode is cut off.")
    timeout_s: float = Field(10.0, gt=0, le=MAX_TIMEOUT_S, description="Wall-clock timeout of each tool call and of the check.")
    scripted_turns: list[str] = Field(default_factory=list, description="Assistant messages the scripted policy replays, in order.")

    @field_validator("check_files")
    @classmethod
    def _check_files_come_from_setup(cls, paths: list[str], info: ValidationInfo) -> list[str]:
        setup = info.data.get("setup")
        files = setup.files if setup is not None else {}
        for path in paths:
            if path not in files:
                raise ValueError(f"{path!r} is not in setup.files; a check file's content comes from there")
        return paths


def load_task(path: str | Path) -> Task:
    """Read and validate a task file; errors name the file and the dotted field."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise TaskError(f"{path}: no such file") from None
    except yaml.YAMLError as e:
        raise TaskError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise TaskError(f"{path}: expected a mapping of task fields, got {type(data).__name__}")
    try:
        return Task.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise TaskError(f"{path}: field {where}: {err['msg']}") from None


class ScriptedPolicy:
    """Replays fixed assistant turns; once they run out it answers with no call (ending the episode)."""

    def __init__(self, turns: list[str]):
        self.turns, self.i = list(turns), 0

    def __call__(self, messages: list[dict]) -> str:
        if self.i >= len(self.turns):
            return "Done."
        self.i += 1
        return self.turns[self.i - 1]


class HFPolicy:
    """Greedy generation with a local Hugging Face checkpoint directory (no hub downloads)."""

    def __init__(self, checkpoint: str | Path, max_new_tokens: int = 256):
        import torch  # heavy imports only when a model policy is asked for
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(checkpoint)
        if not path.is_dir():
            raise TaskError(f"{path}: --policy is neither 'scripted' nor a checkpoint directory")
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
        self.max_new_tokens = max_new_tokens

    def __call__(self, messages: list[dict]) -> str:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        if not isinstance(ids, self.torch.Tensor):  # some versions return a BatchEncoding
            ids = ids["input_ids"]
        with self.torch.no_grad():
            out = self.model.generate(
                ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=self.max_new_tokens,
                do_sample=False, pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            )
        text = self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=False)
        # Keep our tool-call tokens (they may be special tokens) but drop end/pad markers.
        for tok in {self.tokenizer.eos_token, self.tokenizer.pad_token} - {None}:
            text = text.replace(tok, "")
        return text


def make_policy(spec: str, task: Task) -> Policy:
    """`scripted` replays the task's turns; anything else is a checkpoint directory."""
    if spec == "scripted":
        if not task.scripted_turns:
            raise TaskError(f"task {task.name}: field scripted_turns is empty; the scripted policy needs it")
        return ScriptedPolicy(task.scripted_turns)
    return HFPolicy(spec)


def render_result(r: Result) -> str:
    """A tool observation: stdout, then stderr and the exit status when they say something.

    >>> render_result(Result(stdout="hi\\n", stderr="", exit_code=0))
    'hi\\n'
    >>> print(render_result(Result(stdout="", stderr="boom\\n", exit_code=1, truncated=True)))
    [stderr]
    boom
    [exit code 1] [output truncated]
    """
    parts = [r.stdout]
    if r.stderr:
        parts.append(f"[stderr]\n{r.stderr}")
    notes = []
    if r.exit_code != 0:
        notes.append(f"[exit code {r.exit_code}]")
    if r.timed_out:
        notes.append(f"[timed out after {r.duration:.1f}s]")
    if r.oom_killed:
        notes.append("[killed: out of memory]")
    if r.truncated:
        notes.append("[output truncated]")
    return "".join(parts) + " ".join(notes)


def execute(session: Session, call: toolcall.ToolCall, timeout: float) -> str:
    """Run one parsed tool call in the session and return the observation text."""
    a = call.args
    try:
        if call.name == "bash":
            return render_result(session.exec(a["command"], timeout=timeout))
        if call.name == "python":
            return render_result(session.python(a["code"], timeout=timeout))
        if call.name == "write_file":
            session.write_file(a["path"], a["content"])
            return f"wrote {len(a['content'].encode())} bytes to {a['path']}"
        if call.name == "read_file":
            return session.read_file(a["path"])
    except SandboxError as e:
        return f"error: {e}"
    return f"error: tool {call.name} has no executor"


def run_check(session: Session, task: Task) -> Result:
    """Score what the agent left: the task's check, hardened against the agent that ran before it.

    In the episode's own session (the check must see the agent's files), but first every process
    of the episode is killed (background and setsid'd ones too), then `task.check_files` are
    written fresh from `setup.files`, then the check runs with a fixed PATH and a clean
    environment (see `Task.check`). Nothing the agent did can change the verdict except its
    solution files. `Episode.finish` calls it, so both episode loops score this way.
    """
    files = {path: task.setup.files[path] for path in task.check_files}
    try:
        return session.check(task.check, files=files, timeout=task.timeout_s)
    except SandboxError as e:
        return Result.failed(f"check could not run: {e}")


def clip_observation(text: str, limit: int | None) -> str:
    """Tool output cut at `limit` characters, saying so (None: uncut).

    >>> clip_observation("abcdef", 4)
    'abcd\\n[output cut at 4 characters]'
    >>> clip_observation("abcdef", None)
    'abcdef'
    """
    return text if limit is None or len(text) <= limit else text[:limit] + f"\n[output cut at {limit} characters]"


class Episode:
    """One agent episode, stepped by whoever generates: open, then `step` per assistant turn, then `finish`.

    The one episode loop's moving parts, shared by `run_episode` (one episode, a policy callable)
    and `rollout.episodes` (many episodes, one batched generate call per turn). It keeps the
    conversation and the turn count; the driver keeps what is its own (timing of generation,
    tokens). One session serves setup, every turn and the check: the container and its lease live
    for the whole episode, so the check sees the agent's solution (and, by `run_check`, nothing
    else the agent left behind).
    """

    def __init__(self, task: Task, messages: list[dict] | None = None, max_turns: int | None = None,
                 max_observation_chars: int | None = None):
        """`messages`: the conversation before the first turn (default: the tools prompt, then the
        task's prompt). `max_turns` caps the task's own; longer tool output is cut at `max_observation_chars`."""
        self.task = task
        self.messages = list(messages) if messages is not None else [
            {"role": "system", "content": toolcall.tools_prompt()},
            {"role": "user", "content": task.prompt},
        ]
        self.max_turns = task.max_turns if max_turns is None else min(max_turns, task.max_turns)
        self.max_observation_chars = max_observation_chars
        self.turns, self.done = 0, False  # a driver with limits of its own (tokens) may set done too
        self.session: Session | None = None
        self.check: Result | None = None
        self.seconds = {"execute": 0.0}

    def open(self, pool: SandboxPool, trajectory: str | Path | None = None) -> None:
        """Hold a session from `pool` (or a `sandbox.actor.RemotePool`) and write the task's setup into it.

        A setup command that fails is a TaskError (the session is released first).
        """
        self.session = pool.session(trajectory=trajectory)
        try:
            for path, content in self.task.setup.files.items():
                self.session.write_file(path, content)
            for cmd in self.task.setup.commands:
                r = self.session.exec(cmd, timeout=self.task.timeout_s)
                if r.exit_code != 0:
                    raise TaskError(f"task {self.task.name}: setup command {cmd!r} failed: {render_result(r)}")
        except BaseException:
            self.close()
            raise

    def step(self, text: str, cut: bool = False) -> str | None:
        """Take one assistant turn: its tool call's observation (also added as a tool message), or None.

        None when the turn is a final answer (no call), or was `cut` off mid-way (a token limit:
        recorded, not run); either ends the episode, as does the last allowed turn. A turn whose
        call does not parse gets the parser's errors as its observation.
        """
        self.turns += 1
        self.messages.append({"role": "assistant", "content": text})  # reasoning stays in the transcript
        if cut:
            self.done = True
            return None
        parsed = toolcall.parse(text)
        if parsed.errors:
            obs = toolcall.error_observation(parsed.errors)
        elif not parsed.calls:  # a final answer
            self.done = True
            return None
        else:
            t0 = time.monotonic()
            obs = clip_observation(execute(self.session, parsed.calls[0], self.task.timeout_s), self.max_observation_chars)
            self.seconds["execute"] += time.monotonic() - t0
        self.messages.append(toolcall.tool_message(obs))
        if self.turns >= self.max_turns:  # out of turns: the check still decides
            self.done = True
        return obs

    def finish(self) -> Result | None:
        """Run the task's check in the episode's session (`run_check`), then release the session.

        None if the episode never got a session (or already finished).
        """
        if self.session is None:
            return self.check
        try:
            self.check = run_check(self.session, self.task)
        finally:
            self.close()
        return self.check

    def close(self) -> None:
        """Release the session without checking (an episode that failed); a no-op once released."""
        if self.session is not None:
            session, self.session = self.session, None
            session.close()

    @property
    def reward(self) -> float:
        return 1.0 if self.check is not None and self.check.ok else 0.0

    def result(self) -> dict:
        """{"task", "reward", "turns", "messages", "check", "seconds"}: what `rewards.agent` scores."""
        check = {} if self.check is None else {**self.check.to_dict(), "ok": self.check.ok}
        return {"task": self.task.name, "reward": self.reward, "turns": self.turns, "messages": self.messages,
                "check": check, "seconds": dict(self.seconds)}


def run_episode(
    task: Task,
    policy: Policy,
    pool: SandboxPool,  # or a sandbox.actor.RemotePool: anything whose session() has exec/python/write_file/read_file
    transcript: str | Path | None = None,
    trajectory: str | Path | None = None,
) -> dict:
    """Play one episode and return {"reward", "turns", "messages", "check", ...}; writes the transcript JSONL."""
    ep = Episode(task)
    ep.open(pool, trajectory=trajectory)
    generate_s = 0.0
    try:
        while not ep.done:
            t0 = time.monotonic()
            text = policy(ep.messages)
            generate_s += time.monotonic() - t0
            ep.step(text)
        ep.finish()
    finally:
        ep.close()
    out = ep.result()
    out["seconds"] = {"generate": generate_s, **ep.seconds}
    log.info("episode %s: %d turn(s), reward %.1f, generate %.2fs, execute %.2fs",
             task.name, ep.turns, ep.reward, generate_s, ep.seconds["execute"])
    if transcript is not None:
        write_transcript(Path(transcript), out)
    return out


def write_transcript(path: Path, episode: dict) -> None:
    """One JSON line per message, then one line with the check's result and the reward."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for m in episode["messages"]:
            f.write(json.dumps({"type": "message", **m}) + "\n")
        f.write(json.dumps({"type": "reward", "task": episode["task"], "reward": episode["reward"],
                            "turns": episode["turns"], "check": episode["check"]}) + "\n")
