"""pinboard: the bundle's second sample app.

Deliberately unlike xagent: other module paths, no PostgreSQL, its own one-time command
(``pinboard-init``), a readiness path of its own (``/health/ready``), receivers that write
files under the app's state directory, and secrets read from environment variables.
"""
