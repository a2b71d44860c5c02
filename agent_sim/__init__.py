"""The kbbus agent: the runtime a machine runs, and a simulator for whole fleets.

``agent_sim`` owns everything on the agent side of the bus:

- ``runtime``: one MQTT agent (aiomqtt) - registration, presence with epochs
  and a Last Will, heartbeats, tasks and results, reconnects with backoff;
- ``http_agent``: the same agent over the HTTP bridge only;
- ``core``: what both do with a task (never twice, refuse expired ones);
- ``actions``: the named actions KB steps call, simulated or real (``--exec``);
- ``store``: the per-agent state file (id, last epoch, finished tasks);
- ``fleet``: thousands of agents in one process on one event loop, with a
  ramp, a live summary line and chaos knobs (drop, freeze, restart).

It imports ``schemas`` and never ``controller``, ``bridge_http`` or ``kbbus``.
"""
