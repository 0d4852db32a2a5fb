# PostgreSQL 15 for machines with no container registry: the same contract as the
# official `postgres` image where docker-compose.yml relies on it (POSTGRES_PASSWORD,
# POSTGRES_DB, PGDATA, `postgres -c ...` as the command, pg_isready for health checks),
# on the Debian root filesystem docker/build-images.sh imports.
ARG BASE_IMAGE=twopc/debian:bookworm
FROM ${BASE_IMAGE}
ENV PGDATA=/var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
RUN chmod 0755 /usr/local/bin/docker-entrypoint.sh \
 && mkdir -p /var/run/postgresql "$PGDATA" \
 && chown -R postgres:postgres /var/run/postgresql /var/lib/postgresql
STOPSIGNAL SIGINT
EXPOSE 5432
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]
