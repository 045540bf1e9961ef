"""Code that tests run in child processes (``python -m children.NAME`` with ``tests/`` on
the path; started by ``tests/_subproc.py``): a crash or a signal there fails one test
instead of taking pytest down. Each module talks to its test through
:mod:`children.channel`."""
