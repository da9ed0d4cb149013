# make compose-check's stand-in for the official redis image where no registry serves it: Debian's
# redis-server on the stand-in base (scripts/ci/compose_check.py makes `python:3.11-slim` with
# debootstrap there). docker/compose.stand-in.yml puts it in place of the official image; it runs
# the same command (docker-compose.yml), as the user redis, with its data in /data.
FROM python:3.11-slim

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data \
 && chown redis:redis /data

USER redis
WORKDIR /data
EXPOSE 6379
CMD ["redis-server"]
