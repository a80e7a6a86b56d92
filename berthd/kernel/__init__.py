"""Code kernels: an in-sandbox agent (``agent.py``, stdlib only, copied into sandboxes),
its host-side client, and the helpers that start it in a container and find it again.

A kernel's state lives in its agent, never in the daemon: the daemon can be killed and
restarted and reconnect to the same namespace. The protocol is documented in
``agent.py``; ``launch`` says how agents are started on each runtime.

Typical use (a kernel with a container of its own)::

    spec = kernel_spec(ContainerSpec(berth_id, node_id, image), kernel_id, "python")
    runtime.create(spec)
    paths = install_agent(runtime, berth_id, kernel_id)
    runtime.start(berth_id)
    client = AgentClient.connect(paths.socket_path, timeout=30)
    result = client.execute("x = 41\\nx + 1", timeout=10)   # result.return_value == "42"

After a daemon restart: ``AgentClient.connect(locate_agent(runtime, berth_id,
kernel_id).socket_path)``.

The same agent file has a second mode, ``serve-exec``: no kernel, but the commands of
container execs, run on one held runtime exec per container (``exec_agent``), so an exec
costs a round trip instead of a runtime exec.
"""

from berthd.kernel.client import (
    AgentClient,
    AgentInfo,
    AgentUnavailable,
    ConnectionLost,
    ExecutionError,
    ExecutionResult,
    KernelBusy,
    KernelDead,
    KernelError,
    OutputCallback,
    ProtocolError,
    UnknownExecution,
)
from berthd.kernel.launch import (
    LANGUAGES,
    AgentPaths,
    agent_command,
    agent_source,
    exec_agent_command,
    exec_agent_payload,
    install_agent,
    kernel_spec,
    locate_agent,
    start_agent_by_exec,
)

__all__ = [
    "LANGUAGES",
    "AgentClient",
    "AgentInfo",
    "AgentPaths",
    "AgentUnavailable",
    "ConnectionLost",
    "ExecutionError",
    "ExecutionResult",
    "KernelBusy",
    "KernelDead",
    "KernelError",
    "OutputCallback",
    "ProtocolError",
    "UnknownExecution",
    "agent_command",
    "agent_source",
    "exec_agent_command",
    "exec_agent_payload",
    "install_agent",
    "kernel_spec",
    "locate_agent",
    "start_agent_by_exec",
]
