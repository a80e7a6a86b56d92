"""Execs through an in-sandbox agent on a held stream, instead of a runtime exec each.

A runtime exec costs what the engine costs (Docker: create, start, attach, inspect —
tens of milliseconds). An *exec agent* is ``agent.py serve-exec`` (see ``ExecServer`` in
``berthd.kernel.agent``) started once per container by one runtime exec whose stdin and
stdout stay open: the daemon ships the agent's source over that stdin (nothing is
written into the sandbox, no shared directory is needed), then sends one JSON line per
command and reads one back. The agent runs as the runtime exec would run any command
(the same user, environment and filesystem view), so a command gives the same result
either way; an exec then costs a round trip on an open stream plus a fork.

``ExecAgents`` (one per runtime, ``exec_agents(runtime)``) holds one agent per container
and decides, per exec, which way it goes:

* a ready agent: through it (one held stream per container, shared by concurrent execs:
  requests carry ids and answers are matched by a reader thread);
* none yet: the runtime exec, and an agent is started in the background for the next
  ones (``warm=False`` skips that: a one-shot sandbox that is removed right after);
* no ``python3`` (3.8+) in the image: remembered, every exec is a runtime exec;
* the agent could not start the command (a missing executable or working directory):
  nothing ran, so the runtime exec runs it and gives the runtime's exact answer;
* the agent died or its stream broke: before the request was sent, the runtime exec;
  after it, what a runtime exec answers when its container is killed under it: exit code
  137 with the output written so far (the agent sends output as it comes, so the daemon
  has it). That is what happened: the agent's guardian SIGKILLs the commands of an agent
  that ends. When the runtime itself is unreachable, ``RuntimeUnavailable`` instead. The
  next exec starts a new agent.

The agent lives only as long as its stream: when the daemon closes it (``forget``) the
agent sees end-of-file, kills what it runs and exits; when the daemon dies, the agent
ends on the missing heartbeat (a ping every 15 s; Docker keeps an exec's stdin open after
its client vanished). Its commands die with it (a guardian process kills their
sessions, even when the agent was SIGKILLed). Set ``BERTHD_EXEC_AGENT=0`` to disable agents
(every exec a runtime exec).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import signal
import threading
import time
import weakref
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from berthd.kernel.launch import exec_agent_command, exec_agent_payload
from berthd.runtime.base import (
    ExecResult,
    ExecSpec,
    ExecStream,
    Runtime,
    RuntimeFailure,
    SandboxNotFound,
)

__all__ = ["AgentLost", "ExecAgent", "ExecAgents", "NotRun", "exec_agents"]

log = logging.getLogger(__name__)

_HELLO_TIMEOUT = 15.0  # seconds for a new agent to say hello
_RESULT_MARGIN = 15.0  # beyond a command's timeout + the agent's kill grace
_KILL_GRACE = 3.0  # the agent's EXEC_KILL_GRACE
_RETRY_AFTER = 30.0  # seconds before trying again where an agent failed to start
_HEARTBEAT = 60.0  # an agent that hears nothing from us for this long ends itself
_RUNTIMES = ("docker", "local")


class NotRun(Exception):
    """The agent did not start the command (nothing ran): the runtime exec may."""


class AgentLost(Exception):
    """The agent ended while the command ran; ``partial`` is what it wrote until then."""

    def __init__(self, reason: str, partial: ExecResult) -> None:
        super().__init__(reason)
        self.partial = partial


class _Run:
    """A command sent to the agent: its answer to come, and its output so far."""

    __slots__ = ("future", "stdout", "stderr", "cap", "truncated")

    def __init__(self, cap: int = 0) -> None:
        self.future: Future[dict[str, Any]] = Future()
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.cap = cap  # bytes kept per stream, whatever the agent sends
        self.truncated = False

    def add(self, stream: Any, data: bytes) -> None:
        kept = self.stderr if stream == "stderr" else self.stdout
        room = self.cap - len(kept)
        if len(data) > room:
            self.truncated = True
            data = data[: max(0, room)]
        kept.extend(data)


class ExecAgent:
    """One exec agent on its held stream; thread-safe."""

    def __init__(self, stream: ExecStream, berth_id: str) -> None:
        self.berth_id = berth_id
        self._stream = stream
        self._write_lock = threading.Lock()
        self._lock = threading.Lock()  # _pending and _dead
        self._pending: dict[int, _Run] = {}
        self._ids = itertools.count(1)
        self._dead: str | None = None
        self._hello: Future[dict[str, Any]] = Future()
        self.info: dict[str, Any] = {}
        self._stderr = bytearray()
        self._reader = threading.Thread(
            target=self._read, name=f"exec-agent-{berth_id[:12]}", daemon=True
        )

    @classmethod
    def start(
        cls, runtime: Runtime, berth_id: str, *, python: str = "python3",
        timeout: float = _HELLO_TIMEOUT, heartbeat: float = _HEARTBEAT,
    ) -> ExecAgent:
        """Start an agent in the running container; ``RuntimeFailure`` if none comes up
        (no python3, too old, the container stopped). It ends itself when it hears
        nothing for ``heartbeat`` seconds: call ``beat`` more often than that."""
        command = exec_agent_command(python, heartbeat=heartbeat)
        stream = runtime.exec_stream(berth_id, ExecSpec(command=command))
        agent = cls(stream, berth_id)
        agent._reader.start()
        try:
            stream.write_stdin(exec_agent_payload())
            agent.info = agent._hello.result(timeout)
            agent.ping(timeout)  # one round trip, so that the first command's is not the first
        except BaseException as exc:
            reason = agent._dead or str(exc) or type(exc).__name__
            agent.close()
            raise RuntimeFailure(f"no exec agent in {berth_id}: {reason}") from None
        return agent

    @property
    def alive(self) -> bool:
        return self._dead is None

    def run(self, spec: ExecSpec, *, kill_on_exit: bool = False) -> ExecResult:
        """Run ``spec`` through the agent. ``NotRun``: nothing ran (use the runtime
        exec); ``AgentLost``: the agent went away while the command ran."""
        started = time.monotonic()
        run_id = next(self._ids)
        pending = _Run(max(0, spec.output_cap))
        request: dict[str, Any] = {"op": "run", "id": run_id, "argv": list(spec.command),
                                   "output_cap": max(0, spec.output_cap)}
        if spec.env:
            request["env"] = dict(spec.env)
        if spec.workdir:
            request["workdir"] = spec.workdir
        if spec.stdin is not None:
            request["stdin"] = base64.b64encode(spec.stdin).decode()
        if spec.timeout is not None:
            request["timeout"] = spec.timeout
        if kill_on_exit:
            request["kill_on_exit"] = True
        line = (json.dumps(request, separators=(",", ":")) + "\n").encode()
        with self._lock:
            if self._dead is not None:
                raise NotRun(self._dead)
            self._pending[run_id] = pending
        try:
            with self._write_lock:
                self._stream.write_stdin(line)
        except Exception as exc:  # never sent as a whole: the agent cannot have run it
            with self._lock:
                self._pending.pop(run_id, None)
            self._die(f"the agent's stream broke ({exc})")
            raise NotRun(str(exc)) from None
        wait = None if spec.timeout is None else spec.timeout + _KILL_GRACE + _RESULT_MARGIN
        try:
            frame = pending.future.result(wait)
        except FutureTimeout:
            with self._lock:
                self._pending.pop(run_id, None)
            self._cancel(run_id)
            raise RuntimeFailure(
                f"the exec agent did not answer within {wait:g}s; the command was killed") from None
        except _AgentGone as exc:
            with self._lock:  # no more output can come
                stdout, stderr = bytes(pending.stdout), bytes(pending.stderr)
            raise AgentLost(str(exc), ExecResult(
                exit_code=None, stdout=stdout, stderr=stderr,
                duration_ms=(time.monotonic() - started) * 1000, truncated=pending.truncated,
            )) from None
        if frame.get("type") == "error":
            raise NotRun(f"{frame.get('code')}: {frame.get('message')}")
        return ExecResult(
            exit_code=frame.get("exit_code"),
            stdout=bytes(pending.stdout),
            stderr=bytes(pending.stderr),
            duration_ms=(time.monotonic() - started) * 1000,
            truncated=bool(frame.get("truncated")) or pending.truncated,
            timed_out=bool(frame.get("timed_out")),
        )

    def ping(self, timeout: float = 5.0) -> None:
        run_id = next(self._ids)
        pending = _Run()
        with self._lock:
            if self._dead is not None:
                raise NotRun(self._dead)
            self._pending[run_id] = pending
        with self._write_lock:
            self._stream.write_stdin(b'{"op":"ping","id":%d}\n' % run_id)
        pending.future.result(timeout)

    def beat(self) -> None:
        """Tell the agent the daemon is still there (a ping whose answer is ignored)."""
        if self._dead is not None:
            return
        try:
            with self._write_lock:
                self._stream.write_stdin(b'{"op":"ping"}\n')
        except Exception as exc:
            self._die(f"the agent's stream broke ({exc})")

    def close(self) -> None:
        """End the agent: end-of-file on its stdin (it kills its commands and exits),
        then the stream is released."""
        self._die("closed")
        with contextlib.suppress(Exception):
            self._stream.close_stdin()
        with contextlib.suppress(Exception):
            self._stream.close()

    # ------------------------------------------------------------------ internals

    def _cancel(self, run_id: int) -> None:
        with contextlib.suppress(Exception), self._write_lock:
            self._stream.write_stdin(b'{"op":"cancel","id":%d}\n' % run_id)

    def _die(self, reason: str) -> None:
        with self._lock:
            if self._dead is None:
                self._dead = reason
            pending, self._pending = self._pending, {}
        for run in pending.values():
            if not run.future.done():
                run.future.set_exception(_AgentGone(reason))
        if not self._hello.done():
            self._hello.set_exception(_AgentGone(reason))

    def _read(self) -> None:
        buffer = bytearray()
        try:
            for name, chunk in self._stream.output():
                if name != "stdout":
                    self._stderr = (self._stderr + chunk)[-2000:]
                    continue
                buffer += chunk
                while True:
                    end = buffer.find(b"\n")
                    if end < 0:
                        break
                    line = bytes(buffer[:end])
                    del buffer[: end + 1]
                    self._on_line(line)
        except Exception as exc:
            log.debug("exec agent %s: stream failed: %s", self.berth_id, exc)
        said = (self._stderr or buffer).decode("utf-8", "replace").strip()
        self._die("the agent exited" + (f": {said[-500:]}" if said else ""))

    def _on_line(self, line: bytes) -> None:
        try:
            frame = json.loads(line)
        except ValueError:
            return
        if not isinstance(frame, dict):
            return
        if frame.get("type") == "hello":
            if not self._hello.done():
                self._hello.set_result(frame)
            return
        run_id = frame.get("id")
        if frame.get("type") == "output":
            try:
                data = base64.b64decode(frame["data"])
            except (KeyError, TypeError, ValueError):
                return
            with self._lock:
                run = self._pending.get(run_id)  # type: ignore[arg-type]
                if run is not None:
                    run.add(frame.get("stream"), data)
            return
        with self._lock:
            run = self._pending.pop(run_id, None)  # type: ignore[arg-type]
        if run is not None and not run.future.done():
            run.future.set_result(frame)


class _AgentGone(Exception):
    pass


class ExecAgents:
    """The exec agents of one runtime's containers; see the module docstring."""

    def __init__(self, runtime: Runtime, *, enabled: bool = True, python: str = "python3",
                 retry_after: float = _RETRY_AFTER) -> None:
        self.runtime = runtime
        self.enabled = enabled
        self.python = python
        self.retry_after = retry_after
        # The local runtime ends everything an exec started when the exec ends.
        self.kill_on_exit = runtime.name == "local"
        self._lock = threading.Lock()
        self._agents: dict[str, ExecAgent] = {}
        self._unsupported: set[str] = set()
        self._retry_at: dict[str, float] = {}
        self._starting: dict[str, threading.Event] = {}
        self._heart: threading.Thread | None = None
        self.agent_execs = 0
        self.runtime_execs = 0

    def exec(self, berth_id: str, spec: ExecSpec, *, warm: bool = True) -> ExecResult:
        """``spec`` through the container's agent if it has a ready one, else the
        runtime exec (and, with ``warm``, an agent started in the background)."""
        agent = self._agents.get(berth_id) if self.enabled else None
        if agent is not None:
            try:
                result = agent.run(spec, kill_on_exit=self.kill_on_exit)
            except NotRun as exc:
                log.debug("exec agent %s did not run %s: %s", berth_id, spec.command[:1], exc)
            except AgentLost as exc:
                self._drop(berth_id, agent)
                return self._lost(berth_id, spec, exc)
            else:
                with self._lock:
                    self.agent_execs += 1
                return result
            if not agent.alive:  # it died (with its container, say): a new one for next time
                self._drop(berth_id, agent)
                if warm:
                    self.warm(berth_id, wait=False)
        elif warm and self.enabled:
            self.warm(berth_id, wait=False)
        with self._lock:
            self.runtime_execs += 1
        return self.runtime.exec(berth_id, spec)

    def _lost(self, berth_id: str, spec: ExecSpec, lost: AgentLost) -> ExecResult:
        """The answer for a command whose agent ended under it: the guardian SIGKILLed
        it (with its container, most often), so exit code 137 and the output so far, as
        a runtime exec killed with its container answers. A runtime that cannot be
        reached is not a result: ``RuntimeUnavailable`` propagates from the inspect."""
        with contextlib.suppress(SandboxNotFound, RuntimeFailure):
            self.runtime.inspect(berth_id)  # the container may be gone; the runtime not
        log.info("exec agent of %s ended while %s ran (%s): the command was killed",
                 berth_id, spec.command[:1], lost)
        with self._lock:
            self.agent_execs += 1
        return dataclasses.replace(lost.partial, exit_code=128 + signal.SIGKILL)

    def ready(self, berth_id: str) -> bool:
        agent = self._agents.get(berth_id)
        return agent is not None and agent.alive

    def warm(self, berth_id: str, *, wait: bool = True) -> bool:
        """Start the container's agent (unless it has one, or cannot have one); with
        ``wait``, return once it is up: True when it is."""
        if not self.enabled:
            return False
        with self._lock:
            agent = self._agents.get(berth_id)
            if agent is not None and agent.alive:
                return True
            if berth_id in self._unsupported or time.monotonic() < self._retry_at.get(berth_id, 0):
                return False
            event = self._starting.get(berth_id)
            mine = event is None
            if mine:
                event = self._starting[berth_id] = threading.Event()
        assert event is not None
        if mine:
            if wait:
                self._start(berth_id, event)
            else:
                threading.Thread(target=self._start, args=(berth_id, event),
                                 name=f"exec-agent-start-{berth_id[:12]}", daemon=True).start()
                return False
        elif wait:
            event.wait(_HELLO_TIMEOUT + 5)
        return self.ready(berth_id)

    def forget(self, berth_id: str) -> None:
        """The container goes away (removed): end its agent, drop what is known of it."""
        with self._lock:
            agent = self._agents.pop(berth_id, None)
            self._unsupported.discard(berth_id)
            self._retry_at.pop(berth_id, None)
            starting = self._starting.pop(berth_id, None)  # its agent is closed once up
        if starting is not None:
            starting.set()
        if agent is not None:
            agent.close()

    def close(self) -> None:
        with self._lock:
            agents = list(self._agents.values())
            self._agents.clear()
        for agent in agents:
            agent.close()

    def stats(self) -> dict[str, int]:
        """Live agents, and execs that went through one or through the runtime."""
        with self._lock:
            return {"agents": sum(1 for a in self._agents.values() if a.alive),
                    "agent_execs": self.agent_execs, "runtime_execs": self.runtime_execs}

    # ------------------------------------------------------------------ internals

    def _start(self, berth_id: str, event: threading.Event) -> None:
        try:
            agent = ExecAgent.start(self.runtime, berth_id, python=self.python)
        except Exception as exc:
            message = str(exc)
            no_python = "python" in message.lower() and (
                "not found" in message or "No such" in message or "needs Python" in message)
            with self._lock:
                if self._starting.get(berth_id) is not event:
                    pass  # forgotten meanwhile
                elif no_python:
                    self._unsupported.add(berth_id)  # the image will not grow a python3
                else:
                    self._retry_at[berth_id] = time.monotonic() + self.retry_after
            log.debug("exec agent for %s: %s", berth_id, message)
        else:
            with self._lock:
                forgotten = self._starting.get(berth_id) is not event
                old = None if forgotten else self._agents.get(berth_id)
                if not forgotten:
                    self._agents[berth_id] = agent
                if not forgotten and self._heart is None:
                    self._heart = threading.Thread(target=self._beat, name="exec-agents-heartbeat",
                                                   daemon=True)
                    self._heart.start()
            if forgotten:  # the container went away meanwhile
                agent.close()
            if old is not None:
                old.close()
        finally:
            with self._lock:
                if self._starting.get(berth_id) is event:
                    del self._starting[berth_id]
            event.set()

    def _beat(self) -> None:
        """Every quarter heartbeat: a ping to every agent (see ``ExecAgent.start``)."""
        while True:
            time.sleep(_HEARTBEAT / 4)
            with self._lock:
                agents = list(self._agents.items())
                if not agents:
                    self._heart = None  # the next agent started starts a new one
                    return
            for berth_id, agent in agents:
                agent.beat()
                if not agent.alive:
                    self._drop(berth_id, agent)

    def _drop(self, berth_id: str, agent: ExecAgent) -> None:
        with self._lock:
            if self._agents.get(berth_id) is agent:
                del self._agents[berth_id]
        agent.close()


_REGISTRY: weakref.WeakKeyDictionary[Runtime, ExecAgents] = weakref.WeakKeyDictionary()
_REGISTRY_LOCK = threading.Lock()


def exec_agents(runtime: Runtime) -> ExecAgents:
    """The one ``ExecAgents`` of ``runtime`` (enabled on the docker and local runtimes,
    unless ``BERTHD_EXEC_AGENT=0``)."""
    with _REGISTRY_LOCK:
        agents = _REGISTRY.get(runtime)
        if agents is None:
            enabled = runtime.name in _RUNTIMES and os.environ.get("BERTHD_EXEC_AGENT", "1") != "0"
            agents = _REGISTRY[runtime] = ExecAgents(runtime, enabled=enabled)
        return agents
