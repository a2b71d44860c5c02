"""Test helpers: brokers, databases and processes on free ports, and waiting."""
