"""Runtimes that host the API core (`clarity.api`), and nothing else.

`litserve/`: one machine, LitServe workers (`clarity serve`). A runtime adds transport,
workers and scaling; fields, shapes, errors and results are the API core's.
"""
