"""Past one machine: headstart replicas on Ray Serve, each session pinned to one replica.

Every replica runs the whole ASGI app (server/app.py) on its own engine. Ray Serve's HTTP
proxy routes each request with a consistent-hash ring over the session id (router.py), so
a session's turns meet the KV its replica holds; replicas share transcripts through a
PostgreSQL store whose claims are fenced (session/store.py, session/store_pg.py), so when a replica dies or
the replica set changes, the replica a session now hashes to claims it and rebuilds its KV
from the transcript. app.py builds the Serve application (``serve run
headstart.scaleout.app:build_app`` or ``headstart serve --replicas N``); run.py starts it
from the command line.
"""
