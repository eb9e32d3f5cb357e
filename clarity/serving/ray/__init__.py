"""The API core on a Ray cluster, with Ray Serve (`clarity serve --ray ADDRESS`).

`server` is the driver: it connects to the cluster, deploys the application and removes it when
stopped. The application has two deployments: `ingress` (on the head node: the API core's guard,
error shapes, routes, job routes and streamed edits, over FastAPI) and `upscaler` (one replica per
GPU, or per unit of the resource `config.RayConfig` names, every served model loaded; the API core's
`EditHandler` runs each edit). `calls` is what travels between them and how Ray's failures are
answered; `jobs` is the cluster's one job store and job runner, a Ray actor on the head node.
`config` holds the cluster's options and imports no Ray, so the CLI reads it without Ray installed.

`batch` is the driver of `clarity upscale --ray` (a Ray Data job): `batch_actor` the actor that upscales
each image, `batch_storage` where inputs are read and results committed (local folders or S3),
`batch_report` the report at the end.
"""
