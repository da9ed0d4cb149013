"""The receiver: gRPC Receiver.Receive in, status and images out over REST and gRPC
(`python -m receiver_service`).

`grpc_server` accepts a transmission and queues it, and answers GetTransmission and
WatchTransmission; `status` builds the status both APIs answer. `worker` decodes the maps (FDS) and samples
the generator in batches on its thread, `store` keeps each job's status JSON and PNGs on disk
(`redis_store`, made by `store_factory`, is the store replicas share), `app` serves them over
REST (an APIRouter over a typed `ReceiverState`, with long polls from `long_poll`) and runs the
gRPC server, the model loading and the worker in its lifespan. `views` draws the debug maps;
`settings` reads GESCO_RECEIVER_*.
"""
