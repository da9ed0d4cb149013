# make compose-check's stand-in for the official nginx image where no registry serves it: Debian's
# nginx (and curl, for the health check, as the official Debian-based image has it) on the
# stand-in base. docker/compose.stand-in.yml puts it in place of the official image; the site is
# docker/nginx/receivers.conf, mounted by docker-compose.yml as it is for the official image.
FROM python:3.11-slim

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx curl \
 && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/default \
 && ln -sf /dev/stdout /var/log/nginx/access.log \
 && ln -sf /dev/stderr /var/log/nginx/error.log

EXPOSE 8001
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
