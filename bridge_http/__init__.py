"""The HTTP bridge: the original service's HTTP endpoints, mapped onto MQTT.

``bridge_http`` owns a FastAPI app served by uvicorn that speaks only MQTT to
the rest of kbbus, over one connection for the whole process: requests that
need the controller (register, heartbeat, trigger, look-ups, cancel, the
pre-check of a result) go out as request/reply messages with a deadline; long
polls for tasks are answered from the agents' retained task topics; results
posted over HTTP are published on the agent's behalf. It keeps no database and
no state that the bus cannot rebuild.

It imports ``schemas`` and never ``controller``, ``agent_sim`` or ``kbbus``.
Entry points: ``bridge_http.app.create_app`` and ``bridge_http.app.run``, and
``python -m bridge_http``.
"""
