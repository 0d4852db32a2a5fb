#!/bin/sh
# Runs once, when the cluster is created (official postgres image and
# docker/postgres-entrypoint.sh alike): the two roles a twopc agent uses.
#   twopc_system  owns schema twopc (decision and epoch tables); the agent creates it.
#   twopc_app     runs the clients' statements: the bank tables, nothing of twopc but
#                 EXECUTE on the commit function (which the agent grants it).
# Their passwords are read from the files the compose `keygen` step wrote.
set -eu
# psql reads them itself (\set with a backquoted command): they never appear on a
# command line.
psql -v ON_ERROR_STOP=1 -U "${POSTGRES_USER:-postgres}" -d "${POSTGRES_DB:-postgres}" <<'SQL'
\set app_pw `cat /keys/pg-app.password`
\set system_pw `cat /keys/pg-system.password`
CREATE ROLE twopc_system LOGIN NOSUPERUSER PASSWORD :'system_pw';
CREATE ROLE twopc_app LOGIN NOSUPERUSER PASSWORD :'app_pw';
SELECT format('GRANT CREATE ON DATABASE %I TO twopc_system', current_database()) \gexec
-- The bank tables are created later by the superuser (the chaos driver's setup).
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO twopc_app;
SQL
