"""The OpenAI-compatible contract, written once and hosted by every runtime (LitServe, Ray Serve).

`config` holds every server option, `wire` the form fields and response shapes, `errors` the
error shape and the table from Clarity's errors to HTTP answers, `handler` one request from
form to engine to response, `results` where url-mode results are kept, `http` the routes and
checks every HTTP front end shares, `logs` what the server tells its operator. Nothing here
imports a runtime, and the engine only through the public `clarity` API.
"""
