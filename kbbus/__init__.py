"""The ``kbbus`` command: ties the controller, the bridge and the agents together.

This is the only package that may import ``controller``, ``bridge_http`` and
``agent_sim`` at once; it stays thin (argument parsing, process wiring, the
embedded broker and the benchmark driver).
"""
