"""The processes: the supervisor, the per-process frame and the core.

``supervisor`` starts and watches every process; ``proc`` is the frame each
child runs in; ``core`` is the core process's composition root.  The URFA
service (logins, sessions, the call registry and tables, dispatch, events,
the error boundary) lives here too, beside the built-in ``sys.*`` calls.
"""
