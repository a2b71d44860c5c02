"""The controller: the one process that owns state.

It keeps agents, their presence and KB workflows in a database (SQLite or
PostgreSQL, migrated with Alembic) and talks to everything else over MQTT only:
registration and other requests on ``{root}/rpc/*``, heartbeats, status and
results on ``{root}/agents/+/*``, tasks and events out. ``app`` runs the process
(``run(settings)``); ``presence`` and ``registry`` hold the agent rules,
``engine`` and ``kb`` the workflow rules, ``store`` the transactions, ``db`` the
tables. It imports ``schemas`` and never ``bridge_http``, ``agent_sim`` or
``kbbus``.
"""
