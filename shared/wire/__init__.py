"""The protocol and the service plumbing, torch-free, so a process that only speaks gesco (the
sender, a load generator, a health probe) starts without the models.

`transport` frames and validates what travels on the wire, `records` is the transmission record
both REST APIs report, `rest_errors` their one error body, `grpc_service` the servers' shared
health and call opening, `service_settings` the settings base and types, `grpc_security` TLS,
`health_probe` the health check, `monitoring` Prometheus, `logging_setup` JSON logs, `imageio`
bounded image decoding, PNG and resizing, `rest_server` uvicorn, `docs_ui` the API docs pages.
"""
