"""gunicorn config for the naive design "as in the seed" (gunicorn <= 21 timing).

gunicorn >= 22 starts a worker's timeout clock at its first heartbeat, which a uvicorn
worker sends only after its lifespan finished: a slow lifespan is never timed out on 27.
The seed ran an older gunicorn, whose clock started when the worker was forked. This hook
sends one heartbeat right after the fork, which restores exactly that behaviour.
"""


def post_fork(server, worker):
    worker.tmp.notify()
