"""Runtimes that host the API core (`clarity.api`), and nothing else.

`litserve/`: one machine, LitServe workers (`clarity serve`). `ray/`: a Ray cluster, Ray Serve
deployments (`clarity serve --ray`). A runtime adds transport, workers and scaling; fields, shapes,
errors and results are the API core's. Neither imports the other.
"""
