"""The sender: REST and gRPC in front, gRPC to the channel simulator behind (`python -m sender_service`).

`app` holds the routes of POST /v1/transmissions and the health, readiness and metrics endpoints
(an APIRouter over a typed `SenderState`) and `grpc_api` serves Sender.Transmit; both send by
`transmissions` (the parameters, the send path, its errors). `pipeline` turns an upload into the
wire header and symbols (decode, segment, encode; the segmenter loads in a thread, so the process
starts without torch; `budget` picks the map coding for a channel-use budget from the
rate-quality table), `channel_sim_client` streams them to the channel simulator,
`receiver_client` waits for the image over the receiver's REST API for wait=true, `auth` checks
the optional API key and `web` serves the web page. `settings` reads GESCO_SENDER_*.
"""
