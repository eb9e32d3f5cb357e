"""The HTTP front end: an OpenAI-compatible `POST /v1/images/edits` served with LitServe.

`app.build_server` builds the server, `api.UpscaleAPI` is the LitAPI, `openai` holds the
wire format and `files` the url-mode result store.
"""
